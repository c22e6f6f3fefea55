from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Modality(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODALITY_UNSPECIFIED: _ClassVar[Modality]
    MODALITY_TEXT: _ClassVar[Modality]
    MODALITY_VISION: _ClassVar[Modality]
MODALITY_UNSPECIFIED: Modality
MODALITY_TEXT: Modality
MODALITY_VISION: Modality

class Model(_message.Message):
    __slots__ = ("id", "root", "pool", "modality", "max_model_len", "max_images_per_request", "created", "owned_by", "parent")
    ID_FIELD_NUMBER: _ClassVar[int]
    ROOT_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    MODALITY_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGES_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    OWNED_BY_FIELD_NUMBER: _ClassVar[int]
    PARENT_FIELD_NUMBER: _ClassVar[int]
    id: str
    root: str
    pool: str
    modality: Modality
    max_model_len: int
    max_images_per_request: int
    created: int
    owned_by: str
    parent: str
    def __init__(self, id: _Optional[str] = ..., root: _Optional[str] = ..., pool: _Optional[str] = ..., modality: _Optional[_Union[Modality, str]] = ..., max_model_len: _Optional[int] = ..., max_images_per_request: _Optional[int] = ..., created: _Optional[int] = ..., owned_by: _Optional[str] = ..., parent: _Optional[str] = ...) -> None: ...
