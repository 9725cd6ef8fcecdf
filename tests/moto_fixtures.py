"""Talking to the moto server of conftest's `moto_endpoint`: the environment a process needs to
reach it as AWS, and a KMS client of this process's own."""

from __future__ import annotations

from typing import Any

import boto3


def moto_environ(endpoint: str, region: str) -> dict[str, str]:
    """AWS's variables for a process that should reach moto (and never a real account)."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": region,
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def moto_kms(endpoint: str, region: str) -> Any:
    return boto3.client(
        "kms",
        region_name=region,
        endpoint_url=endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
