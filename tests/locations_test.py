import pytest

from orbax_surgery import locations


@pytest.mark.parametrize(
    'given, absolute',
    [
        ('s3://b/run/1/', 's3://b/run/1'),
        ('gs://b//x/./y', 'gs://b/x/y'),
        ('https://h.co/m/resolve/main/', 'https://h.co/m/resolve/main'),
        ('s3://b', 's3://b'),
    ],
)
def test_urls_are_normalized_not_made_local(given, absolute):
    assert locations.is_url(given) and locations.absolute(given) == absolute


def test_local_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert locations.absolute('run/1') == str(tmp_path / 'run' / '1')
    assert not locations.is_url('run/1') and not locations.is_url('file.safetensors')


def test_join_parent_and_name():
    assert locations.join('s3://b/run', '1', 'default') == 's3://b/run/1/default'
    assert locations.parent('gs://b/hf/model.safetensors') == 'gs://b/hf'
    assert locations.name('https://h/x/model.safetensors') == 'model.safetensors'
    assert locations.is_cloud('gs://b/x') and not locations.is_cloud('http://h/x')


def test_s3_specs_take_the_endpoint_and_region_from_the_environment(monkeypatch):
    monkeypatch.setenv('AWS_ENDPOINT_URL', 'http://127.0.0.1:9000')
    monkeypatch.setenv('AWS_REGION', 'eu-west-1')
    assert locations.kvstore('s3://b/run/1') == {
        'driver': 's3',
        'bucket': 'b',
        'path': 'run/1/',
        'endpoint': 'http://127.0.0.1:9000',
        'aws_region': 'eu-west-1',
    }
    monkeypatch.setenv('AWS_ENDPOINT_URL_S3', 'http://127.0.0.1:9001')
    assert locations.kvstore('s3://b')['endpoint'] == 'http://127.0.0.1:9001'


def test_messages_never_show_credentials():
    url = 'https://user:pw@h.co:8443/m/model.safetensors?X-Amz-Signature=abc#f'
    assert locations.shown(url) == 'https://h.co:8443/m/model.safetensors'


def test_a_bad_context_spec_says_what_is_wrong(monkeypatch):
    monkeypatch.setenv('ORBAX_SURGERY_TS_CONTEXT', '{not json')
    with pytest.raises(ValueError, match='ORBAX_SURGERY_TS_CONTEXT is not JSON'):
        locations.context_spec()
