import pytest

from orbax_surgery.units import format_bytes, parse_bytes


@pytest.mark.parametrize(
    'n, text',
    [
        (0, '0 B'),
        (1023, '1023 B'),
        (1024, '1.0 KiB'),
        (5 * 2**20 + 2**19, '5.5 MiB'),
        (2**50, '1024.0 TiB'),
    ],
)
def test_format_bytes_uses_binary_units(n, text):
    assert format_bytes(n) == text


@pytest.mark.parametrize(
    'text, n',
    [
        ('1', 1),
        ('512M', 512 * 2**20),
        ('2g', 2 * 2**30),
        ('1.5K', 1536),
        ('500MB', 500 * 10**6),
        ('5GB', 5 * 10**9),
        ('512MiB', 512 * 2**20),
        (' 3 TiB ', 3 * 2**40),
    ],
)
def test_parse_bytes_reads_binary_and_decimal_units(text, n):
    assert parse_bytes(text) == n


@pytest.mark.parametrize('text', ['', '0', '-1M', 'M', '5 apples', '1e6', '5 G B'])
def test_parse_bytes_refuses_what_is_not_a_size(text):
    assert parse_bytes(text) is None
