"""moto's KMS server on loopback, checking SigV4 for an IAM user allowed ``kms:*``."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

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
