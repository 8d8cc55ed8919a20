from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DataType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DATA_TYPE_UNSPECIFIED: _ClassVar[DataType]
    FLOAT32: _ClassVar[DataType]
    FLOAT16: _ClassVar[DataType]
    UINT8: _ClassVar[DataType]
    INT32: _ClassVar[DataType]
DATA_TYPE_UNSPECIFIED: DataType
FLOAT32: DataType
FLOAT16: DataType
UINT8: DataType
INT32: DataType

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DataType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DataType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ("model", "encoded_image", "tensor", "tasks", "output_dtype", "segmentation_probabilities", "probabilities")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ENCODED_IMAGE_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    SEGMENTATION_PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    model: str
    encoded_image: bytes
    tensor: Tensor
    tasks: _containers.RepeatedScalarFieldContainer[str]
    output_dtype: DataType
    segmentation_probabilities: bool
    probabilities: bool
    def __init__(self, model: _Optional[str] = ..., encoded_image: _Optional[bytes] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ..., tasks: _Optional[_Iterable[str]] = ..., output_dtype: _Optional[_Union[DataType, str]] = ..., segmentation_probabilities: _Optional[bool] = ..., probabilities: _Optional[bool] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("model", "model_version", "outputs", "timings")
    class OutputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: TaskOutput
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[TaskOutput, _Mapping]] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    model: str
    model_version: int
    outputs: _containers.MessageMap[str, TaskOutput]
    timings: Timings
    def __init__(self, model: _Optional[str] = ..., model_version: _Optional[int] = ..., outputs: _Optional[_Mapping[str, TaskOutput]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ...) -> None: ...

class TaskOutput(_message.Message):
    __slots__ = ("segmentation", "depth", "normal", "attributes", "edges")
    SEGMENTATION_FIELD_NUMBER: _ClassVar[int]
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    NORMAL_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    EDGES_FIELD_NUMBER: _ClassVar[int]
    segmentation: Segmentation
    depth: Depth
    normal: Normal
    attributes: Attributes
    edges: Edges
    def __init__(self, segmentation: _Optional[_Union[Segmentation, _Mapping]] = ..., depth: _Optional[_Union[Depth, _Mapping]] = ..., normal: _Optional[_Union[Normal, _Mapping]] = ..., attributes: _Optional[_Union[Attributes, _Mapping]] = ..., edges: _Optional[_Union[Edges, _Mapping]] = ...) -> None: ...

class Segmentation(_message.Message):
    __slots__ = ("class_map", "probabilities")
    CLASS_MAP_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    class_map: Tensor
    probabilities: Tensor
    def __init__(self, class_map: _Optional[_Union[Tensor, _Mapping]] = ..., probabilities: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class Depth(_message.Message):
    __slots__ = ("depth",)
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    depth: Tensor
    def __init__(self, depth: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class Normal(_message.Message):
    __slots__ = ("normal",)
    NORMAL_FIELD_NUMBER: _ClassVar[int]
    normal: Tensor
    def __init__(self, normal: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class Attributes(_message.Message):
    __slots__ = ("probabilities",)
    class ProbabilitiesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    probabilities: _containers.ScalarMap[str, float]
    def __init__(self, probabilities: _Optional[_Mapping[str, float]] = ...) -> None: ...

class Edges(_message.Message):
    __slots__ = ("edge_map", "probabilities")
    EDGE_MAP_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    edge_map: Tensor
    probabilities: Tensor
    def __init__(self, edge_map: _Optional[_Union[Tensor, _Mapping]] = ..., probabilities: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("decode_ms", "preprocess_ms", "queue_ms", "inference_ms", "postprocess_ms", "total_ms", "batch_size")
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    PREPROCESS_MS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_MS_FIELD_NUMBER: _ClassVar[int]
    POSTPROCESS_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    decode_ms: float
    preprocess_ms: float
    queue_ms: float
    inference_ms: float
    postprocess_ms: float
    total_ms: float
    batch_size: int
    def __init__(self, decode_ms: _Optional[float] = ..., preprocess_ms: _Optional[float] = ..., queue_ms: _Optional[float] = ..., inference_ms: _Optional[float] = ..., postprocess_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., batch_size: _Optional[int] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "ready", "backend", "input", "tasks", "max_batch_size", "parameters", "macs")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    MACS_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    ready: bool
    backend: str
    input: InputInfo
    tasks: _containers.RepeatedCompositeFieldContainer[TaskInfo]
    max_batch_size: int
    parameters: int
    macs: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., ready: _Optional[bool] = ..., backend: _Optional[str] = ..., input: _Optional[_Union[InputInfo, _Mapping]] = ..., tasks: _Optional[_Iterable[_Union[TaskInfo, _Mapping]]] = ..., max_batch_size: _Optional[int] = ..., parameters: _Optional[int] = ..., macs: _Optional[int] = ...) -> None: ...

class InputInfo(_message.Message):
    __slots__ = ("height", "width", "channels", "color", "encodings")
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    COLOR_FIELD_NUMBER: _ClassVar[int]
    ENCODINGS_FIELD_NUMBER: _ClassVar[int]
    height: int
    width: int
    channels: int
    color: str
    encodings: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, height: _Optional[int] = ..., width: _Optional[int] = ..., channels: _Optional[int] = ..., color: _Optional[str] = ..., encodings: _Optional[_Iterable[str]] = ...) -> None: ...

class TaskInfo(_message.Message):
    __slots__ = ("name", "kind", "channels", "class_names", "attribute_names", "unit", "semantics")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTE_NAMES_FIELD_NUMBER: _ClassVar[int]
    UNIT_FIELD_NUMBER: _ClassVar[int]
    SEMANTICS_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    channels: int
    class_names: _containers.RepeatedScalarFieldContainer[str]
    attribute_names: _containers.RepeatedScalarFieldContainer[str]
    unit: str
    semantics: str
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., channels: _Optional[int] = ..., class_names: _Optional[_Iterable[str]] = ..., attribute_names: _Optional[_Iterable[str]] = ..., unit: _Optional[str] = ..., semantics: _Optional[str] = ...) -> None: ...
