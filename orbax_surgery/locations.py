"""Where checkpoints live: local paths, and gs://, s3:// and http(s):// URLs.

One notion for every reader and writer. A location is a string: a local path
(made absolute) or a URL (kept as given, without a trailing '/'). `kvstore`
turns one into a TensorStore kvstore spec, with credentials left to the
ecosystem's default chains: Google's application default credentials for
gs:// (and `TENSORSTORE_GCS_HTTP_URL` for an emulator), the AWS chain for s3://
(environment, profile, instance role), plus `AWS_ENDPOINT_URL`/`AWS_REGION`,
which TensorStore's own s3 URL parsing ignores. For more (request concurrency,
retries, explicit credentials, a requester-pays project), put a TensorStore
context spec as JSON in `ORBAX_SURGERY_TS_CONTEXT`; every kvstore and array this
package opens uses it. No spec here holds a secret, and `shown` strips
anything that could be one from a URL before a message prints it.
"""

from __future__ import annotations

import json
import os
import posixpath
import urllib.parse
from typing import Any

Location = str
CLOUD_SCHEMES = ('gs', 's3')
URL_SCHEMES = (*CLOUD_SCHEMES, 'http', 'https')


def is_url(location: Any) -> bool:
    """Whether `location` is a gs://, s3:// or http(s):// URL (not a local path).

    Example:
        >>> is_url('s3://ckpts/run/1'), is_url('/tmp/run'), is_url('file.safetensors')
        (True, False, False)
    """
    return isinstance(location, str | os.PathLike) and _scheme(os.fspath(location)) in URL_SCHEMES


def is_cloud(location: Any) -> bool:
    """Whether `location` is in object storage (gs:// or s3://), where objects are written whole."""
    return is_url(location) and _scheme(os.fspath(location)) in CLOUD_SCHEMES


def absolute(location: Any) -> Location:
    """A local path made absolute, or a URL normalized (no trailing or doubled '/').

    Example:
        >>> absolute('s3://ckpts//run/1/'), absolute('/tmp/./run')
        ('s3://ckpts/run/1', '/tmp/run')
    """
    text = os.fspath(location)
    if not is_url(text):
        return os.path.abspath(text)
    parsed = urllib.parse.urlsplit(text)
    path = '/' + posixpath.normpath(parsed.path).lstrip('/') if parsed.path.strip('/') else ''
    return urllib.parse.urlunsplit(parsed._replace(path=path.rstrip('/')))


def join(location: Location, *names: str) -> Location:
    """A location inside `location`: `join('s3://b/run', '1')` is 's3://b/run/1'."""
    if not is_url(location):
        return os.path.join(location, *names)
    return '/'.join([location.rstrip('/'), *(n.strip('/') for n in names)])


def parent(location: Location) -> Location:
    """The directory holding `location`."""
    if not is_url(location):
        return os.path.dirname(location)
    parsed = urllib.parse.urlsplit(location)
    return urllib.parse.urlunsplit(parsed._replace(path=posixpath.dirname(parsed.path)))


def name(location: Location) -> str:
    """The last part of `location`: 'model.safetensors' of '.../model.safetensors'."""
    return posixpath.basename(
        urllib.parse.urlsplit(location).path if is_url(location) else location
    )


def kvstore(location: Location) -> dict[str, Any]:
    """The TensorStore kvstore spec of a directory (or a key prefix).

    Example:
        >>> kvstore('gs://ckpts/run')
        {'driver': 'gcs', 'bucket': 'ckpts', 'path': 'run/'}
        >>> kvstore('https://example.com/models/x')
        {'driver': 'http', 'base_url': 'https://example.com', 'path': '/models/x/'}
    """
    location = absolute(location)
    if not is_url(location):
        return {'driver': 'file', 'path': location.rstrip('/') + '/'}
    parsed = urllib.parse.urlsplit(location)
    path = parsed.path.strip('/')
    prefix = path + '/' if path else ''
    if parsed.scheme == 'gs':
        return {'driver': 'gcs', 'bucket': parsed.netloc, 'path': prefix}
    if parsed.scheme == 's3':
        spec: dict[str, Any] = {'driver': 's3', 'bucket': parsed.netloc, 'path': prefix}
        endpoint = os.environ.get('AWS_ENDPOINT_URL_S3') or os.environ.get('AWS_ENDPOINT_URL')
        region = os.environ.get('AWS_REGION') or os.environ.get('AWS_DEFAULT_REGION')
        if endpoint:
            spec['endpoint'] = endpoint
        if region:
            spec['aws_region'] = region
        return spec
    base = urllib.parse.urlunsplit((parsed.scheme, parsed.netloc, '', '', ''))
    return {'driver': 'http', 'base_url': base, 'path': '/' + prefix}


def context_spec() -> dict[str, Any]:
    """The TensorStore context spec a user set in `ORBAX_SURGERY_TS_CONTEXT` (JSON), or {}.

    Example:
        >>> os.environ['ORBAX_SURGERY_TS_CONTEXT'] = '{"s3_request_concurrency": {"limit": 8}}'
        >>> context_spec()
        {'s3_request_concurrency': {'limit': 8}}
        >>> del os.environ['ORBAX_SURGERY_TS_CONTEXT']
    """
    text = os.environ.get('ORBAX_SURGERY_TS_CONTEXT', '').strip()
    if not text:
        return {}
    try:
        spec = json.loads(text)
    except ValueError as e:
        raise ValueError(f'ORBAX_SURGERY_TS_CONTEXT is not JSON: {e}') from None
    if not isinstance(spec, dict):
        raise ValueError('ORBAX_SURGERY_TS_CONTEXT is a JSON object of TensorStore resources.')
    return spec


def split(location: Location) -> tuple[Location, str]:
    """A file's directory and its name, the kvstore and the key to read it through."""
    return parent(location), name(location)


def shown(location: Any) -> str:
    """`location` for a message: a URL without user, password, query or fragment.

    Example:
        >>> shown('https://user:token@example.com/m.safetensors?sig=abc')
        'https://example.com/m.safetensors'
    """
    text = os.fspath(location)
    if not is_url(text):
        return text
    parsed = urllib.parse.urlsplit(text)
    host = parsed.hostname or ''
    if parsed.port:
        host += f':{parsed.port}'
    return urllib.parse.urlunsplit((parsed.scheme, host, parsed.path, '', ''))


def _scheme(text: str) -> str:
    head, sep, _ = text.partition('://')
    return head.lower() if sep else ''


def forget_listings(location: Location) -> None:
    """Drops what `etils.epath` (fsspec) remembers of object-storage listings.

    fsspec caches directory listings per process; objects another process wrote
    or removed since would otherwise look absent, or present.
    """
    if not is_cloud(location):
        return
    from etils.epath import backend

    backend.fsspec_backend.fs(location).invalidate_cache()
