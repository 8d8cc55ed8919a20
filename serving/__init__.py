"""Serving: Triton model repositories from exported runs (`serving.convert`) and the gateway."""
