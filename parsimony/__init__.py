"""The contract between training, serving and clients: what an exported model is and how its
answers travel. It depends only on the standard library, numpy and pydantic, so the gateway, the
converter and the client library never load PyTorch.

| module                 | what it owns                                                              |
|------------------------|---------------------------------------------------------------------------|
| `parsimony.errors`     | the error types shared by the offline tools (file, config, spec errors)    |
| `parsimony.io`         | atomic file writes (staged file, staged folder, folder swap)               |
| `parsimony.layout`     | the file layout of a run directory and of a model repository's versions   |
| `parsimony.spec`       | the tensor spec of an exported graph (names, dtypes, shapes)              |
| `parsimony.manifest`   | ``manifest.json`` as a versioned pydantic model, read and written only here |
| `parsimony.tasks`      | the task kinds: outputs, semantics, wire encoding, what a client draws    |
| `parsimony.wire`       | the wire vocabulary: dtypes, timing stages, image formats, status codes   |
| `parsimony.onnxrt`     | ONNX Runtime session options (imports onnxruntime only when called)       |
"""
