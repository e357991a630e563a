"""The start-up check of an object-store workdir: its bucket exists and these credentials reach it.

A ``gs://`` workdir is written by three clients (``etils.epath`` on TensorFlow's GCS file system
for our files and orbax's metadata, tensorstore for orbax's arrays, google-cloud-storage for
orbax's bucket checks), each with its own retries: a missing bucket or missing credentials
would surface minutes later as a traceback from one of them. ``check_workdir`` asks once, with
google-cloud-storage (the same Application Default Credentials the others use), before a run
does any work, and turns each failure into one RestJaxError naming the bucket and what to check.
"""

from __future__ import annotations

from rest_jax.errors import RestJaxError

_CREDENTIALS = ("On a Cloud TPU / GCE VM the VM's service account is used (nothing to set; check "
                "that it has a storage scope and a role with storage.objects.* on the bucket); "
                "elsewhere run `gcloud auth application-default login` or set "
                "GOOGLE_APPLICATION_CREDENTIALS to a service-account key file.")


def bucket_of(path: str) -> str | None:
  """``gs://bucket/a/b`` -> ``bucket``; None for a path that is not on GCS."""
  if not str(path).startswith("gs://"):
    return None
  return str(path)[len("gs://"):].split("/", 1)[0]


def check_workdir(path: str, *, timeout_s: float = 30.0) -> None:
  """For a ``gs://`` path: RestJaxError unless its bucket exists and can be listed with these
  credentials (one request, no retries). Other paths: nothing to check.

  Raises:
    RestJaxError: no bucket name, google-cloud-storage missing, no credentials, the bucket does
      not exist, access is denied, or the storage endpoint cannot be reached (names the bucket
      and what to check).
  """
  bucket = bucket_of(path)
  if bucket is None:
    if str(path).startswith("gs:"):  # gs:/b/x would be a local folder named "gs:".
      raise RestJaxError(f"{path} is not a GCS URL; write gs://BUCKET/path (two slashes).")
    return
  if not bucket:
    raise RestJaxError(f"{path} names no bucket; write gs://BUCKET/path.")
  # pylint: disable=g-import-not-at-top
  try:
    import google.auth.exceptions as auth_errors
    from google.api_core import exceptions as api_errors
    from google.cloud import storage as gcs
  except ImportError:
    raise RestJaxError(f"a gs:// workdir ({path}) needs google-cloud-storage (orbax uses it for "
                       "checkpoints on GCS): pip install google-cloud-storage.") from None
  import requests
  where = f"gs://{bucket}"
  try:
    client = gcs.Client()
    prefix = str(path)[len(where):].strip("/")
    list(client.list_blobs(bucket, prefix=prefix + "/" if prefix else None, max_results=1,
                           timeout=timeout_s, retry=None))
  except (auth_errors.DefaultCredentialsError, auth_errors.RefreshError,
          auth_errors.TransportError) as e:
    raise RestJaxError(f"no usable Google Cloud credentials to reach {where} "
                       f"({_first_line(e)}). {_CREDENTIALS}") from None
  except api_errors.NotFound:
    raise RestJaxError(f"bucket {where} does not exist (for the workdir {path}); check its "
                       "name, or create it: gcloud storage buckets create "
                       f"{where} --location=REGION (the TPU's region).") from None
  except (api_errors.Forbidden, api_errors.Unauthorized) as e:
    raise RestJaxError(f"access to bucket {where} is denied ({_first_line(e)}); check that "
                       "these credentials may list and write objects there (e.g. "
                       f"roles/storage.objectAdmin). {_CREDENTIALS}") from None
  except (requests.exceptions.RequestException, api_errors.GoogleAPIError, OSError) as e:
    raise RestJaxError(f"cannot reach bucket {where} ({_first_line(e)}); check the network "
                       "connection (and STORAGE_EMULATOR_HOST if you use an emulator), then "
                       "rerun.") from None


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return (text[0] if text else type(error).__name__)[:200]
