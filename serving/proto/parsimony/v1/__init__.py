"""Generated from gateway.proto by ``python -m serving.proto.generate``; do not edit."""
