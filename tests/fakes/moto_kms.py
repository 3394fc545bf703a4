"""moto's KMS server on loopback, checking SigV4 for an IAM user allowed ``kms:*``."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from cape.enclave.awskeys import AwsKmsConfig
from cape.enclave.awskms import AwsCredentials

REGION = "us-east-1"


@contextmanager
def moto_kms() -> Iterator[tuple[int, AwsCredentials]]:
    """Yields the server's port and credentials it accepts; every request is authenticated."""
    import boto3
    import moto.settings
    from moto.moto_server.threaded_moto_server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    port = server.get_host_and_port()[1]
    # moto keeps its state per process, not per server: start from nothing.
    reset = urllib.request.Request(f"http://127.0.0.1:{port}/moto-api/reset", method="POST")
    urllib.request.urlopen(reset, timeout=30).close()
    bootstrap = {"aws_access_key_id": "bootstrap", "aws_secret_access_key": "bootstrap"}
    iam = boto3.client(
        "iam", region_name=REGION, endpoint_url=f"http://127.0.0.1:{port}", **bootstrap
    )
    iam.create_user(UserName="enclave")
    statement = {"Effect": "Allow", "Action": "kms:*", "Resource": "*"}
    iam.put_user_policy(
        UserName="enclave",
        PolicyName="kms",
        PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [statement]}),
    )
    key = iam.create_access_key(UserName="enclave")["AccessKey"]
    saved = moto.settings.INITIAL_NO_AUTH_ACTION_COUNT
    moto.settings.INITIAL_NO_AUTH_ACTION_COUNT = 0  # from now on every request is verified
    try:
        yield port, AwsCredentials(key["AccessKeyId"], key["SecretAccessKey"])
    finally:
        moto.settings.INITIAL_NO_AUTH_ACTION_COUNT = saved
        server.stop()


def configure(config: AwsKmsConfig, credentials: AwsCredentials) -> Callable[[], dict[str, Any]]:
    """A launcher's ``configure`` callback for ``--kms aws``: the account's configuration and
    the credentials the enclave calls KMS with (what the host hands a Nitro enclave)."""

    def frame() -> dict[str, Any]:
        return {
            "aws_kms": config.to_frame(),
            "credentials": {
                "AccessKeyId": credentials.access_key_id,
                "SecretAccessKey": credentials.secret_access_key,
            },
        }

    return frame


def public_key(port: int, credentials: AwsCredentials, owner: str) -> bytes:
    """The public key moto's KMS holds for ``owner``'s Cape key (``alias/cape/<owner>``)."""
    import boto3

    kms = boto3.client(
        "kms",
        region_name=REGION,
        endpoint_url=f"http://127.0.0.1:{port}",
        aws_access_key_id=credentials.access_key_id,
        aws_secret_access_key=credentials.secret_access_key,
    )
    key: bytes = kms.get_public_key(KeyId=f"alias/cape/{owner}")["PublicKey"]
    return key
