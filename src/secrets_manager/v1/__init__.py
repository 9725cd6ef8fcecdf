"""Generated gRPC code for proto/secrets_manager/v1 (do not edit; see scripts/generate_proto.py)."""
