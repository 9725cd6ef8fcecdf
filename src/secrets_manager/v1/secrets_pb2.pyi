from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SecretVersion(_message.Message):
    __slots__ = ("name", "version", "value", "labels", "created", "expires", "target")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    value: bytes
    labels: _containers.RepeatedScalarFieldContainer[str]
    created: str
    expires: str
    target: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., value: _Optional[bytes] = ..., labels: _Optional[_Iterable[str]] = ..., created: _Optional[str] = ..., expires: _Optional[str] = ..., target: _Optional[str] = ...) -> None: ...

class VersionInfo(_message.Message):
    __slots__ = ("version", "created", "created_by", "labels", "destroyed")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    CREATED_BY_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    DESTROYED_FIELD_NUMBER: _ClassVar[int]
    version: int
    created: str
    created_by: str
    labels: _containers.RepeatedScalarFieldContainer[str]
    destroyed: bool
    def __init__(self, version: _Optional[int] = ..., created: _Optional[str] = ..., created_by: _Optional[str] = ..., labels: _Optional[_Iterable[str]] = ..., destroyed: _Optional[bool] = ...) -> None: ...

class SecretMetadata(_message.Message):
    __slots__ = ("name", "namespace", "created", "updated", "created_by", "description", "tags", "current_version", "versions", "deleted", "max_versions", "expires")
    class TagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    UPDATED_FIELD_NUMBER: _ClassVar[int]
    CREATED_BY_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    CURRENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    DELETED_FIELD_NUMBER: _ClassVar[int]
    MAX_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_FIELD_NUMBER: _ClassVar[int]
    name: str
    namespace: str
    created: str
    updated: str
    created_by: str
    description: str
    tags: _containers.ScalarMap[str, str]
    current_version: int
    versions: _containers.RepeatedCompositeFieldContainer[VersionInfo]
    deleted: str
    max_versions: int
    expires: str
    def __init__(self, name: _Optional[str] = ..., namespace: _Optional[str] = ..., created: _Optional[str] = ..., updated: _Optional[str] = ..., created_by: _Optional[str] = ..., description: _Optional[str] = ..., tags: _Optional[_Mapping[str, str]] = ..., current_version: _Optional[int] = ..., versions: _Optional[_Iterable[_Union[VersionInfo, _Mapping]]] = ..., deleted: _Optional[str] = ..., max_versions: _Optional[int] = ..., expires: _Optional[str] = ...) -> None: ...

class GetSecretRequest(_message.Message):
    __slots__ = ("name", "version", "label")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    label: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., label: _Optional[str] = ...) -> None: ...

class GetSecretResponse(_message.Message):
    __slots__ = ("secret",)
    SECRET_FIELD_NUMBER: _ClassVar[int]
    secret: SecretVersion
    def __init__(self, secret: _Optional[_Union[SecretVersion, _Mapping]] = ...) -> None: ...

class BatchGetSecretsRequest(_message.Message):
    __slots__ = ("names", "prefix", "page_size", "page_token")
    NAMES_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    names: _containers.RepeatedScalarFieldContainer[str]
    prefix: str
    page_size: int
    page_token: str
    def __init__(self, names: _Optional[_Iterable[str]] = ..., prefix: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class BatchGetSecretsResponse(_message.Message):
    __slots__ = ("secrets", "next_page_token")
    SECRETS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    secrets: _containers.RepeatedCompositeFieldContainer[SecretVersion]
    next_page_token: str
    def __init__(self, secrets: _Optional[_Iterable[_Union[SecretVersion, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class PutSecretRequest(_message.Message):
    __slots__ = ("name", "value", "expect_version", "description", "tags", "replace_tags", "max_versions", "expires")
    class TagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    EXPECT_VERSION_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    REPLACE_TAGS_FIELD_NUMBER: _ClassVar[int]
    MAX_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_FIELD_NUMBER: _ClassVar[int]
    name: str
    value: bytes
    expect_version: int
    description: str
    tags: _containers.ScalarMap[str, str]
    replace_tags: bool
    max_versions: int
    expires: str
    def __init__(self, name: _Optional[str] = ..., value: _Optional[bytes] = ..., expect_version: _Optional[int] = ..., description: _Optional[str] = ..., tags: _Optional[_Mapping[str, str]] = ..., replace_tags: _Optional[bool] = ..., max_versions: _Optional[int] = ..., expires: _Optional[str] = ...) -> None: ...

class PutSecretResponse(_message.Message):
    __slots__ = ("name", "version", "created", "created_by", "expires")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    CREATED_BY_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    created: str
    created_by: str
    expires: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., created: _Optional[str] = ..., created_by: _Optional[str] = ..., expires: _Optional[str] = ...) -> None: ...

class ListSecretsRequest(_message.Message):
    __slots__ = ("prefix", "include_deleted", "page_size", "page_token")
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_DELETED_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    prefix: str
    include_deleted: bool
    page_size: int
    page_token: str
    def __init__(self, prefix: _Optional[str] = ..., include_deleted: _Optional[bool] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListSecretsResponse(_message.Message):
    __slots__ = ("secrets", "next_page_token")
    SECRETS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    secrets: _containers.RepeatedCompositeFieldContainer[SecretMetadata]
    next_page_token: str
    def __init__(self, secrets: _Optional[_Iterable[_Union[SecretMetadata, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DescribeSecretRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DescribeSecretResponse(_message.Message):
    __slots__ = ("metadata",)
    METADATA_FIELD_NUMBER: _ClassVar[int]
    metadata: SecretMetadata
    def __init__(self, metadata: _Optional[_Union[SecretMetadata, _Mapping]] = ...) -> None: ...

class UpdateSecretMetadataRequest(_message.Message):
    __slots__ = ("name", "description", "set_tags", "remove_tags", "max_versions", "expires")
    class SetTagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    SET_TAGS_FIELD_NUMBER: _ClassVar[int]
    REMOVE_TAGS_FIELD_NUMBER: _ClassVar[int]
    MAX_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    set_tags: _containers.ScalarMap[str, str]
    remove_tags: _containers.RepeatedScalarFieldContainer[str]
    max_versions: int
    expires: str
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., set_tags: _Optional[_Mapping[str, str]] = ..., remove_tags: _Optional[_Iterable[str]] = ..., max_versions: _Optional[int] = ..., expires: _Optional[str] = ...) -> None: ...

class UpdateSecretMetadataIfCurrentRequest(_message.Message):
    __slots__ = ("name", "description", "set_tags", "remove_tags", "max_versions", "expires", "expect_current")
    class SetTagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    SET_TAGS_FIELD_NUMBER: _ClassVar[int]
    REMOVE_TAGS_FIELD_NUMBER: _ClassVar[int]
    MAX_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_FIELD_NUMBER: _ClassVar[int]
    EXPECT_CURRENT_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    set_tags: _containers.ScalarMap[str, str]
    remove_tags: _containers.RepeatedScalarFieldContainer[str]
    max_versions: int
    expires: str
    expect_current: int
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., set_tags: _Optional[_Mapping[str, str]] = ..., remove_tags: _Optional[_Iterable[str]] = ..., max_versions: _Optional[int] = ..., expires: _Optional[str] = ..., expect_current: _Optional[int] = ...) -> None: ...

class UpdateSecretMetadataResponse(_message.Message):
    __slots__ = ("expires",)
    EXPIRES_FIELD_NUMBER: _ClassVar[int]
    expires: str
    def __init__(self, expires: _Optional[str] = ...) -> None: ...

class DeleteSecretRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteSecretResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DeleteSecretIfCurrentRequest(_message.Message):
    __slots__ = ("name", "expect_version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    EXPECT_VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    expect_version: int
    def __init__(self, name: _Optional[str] = ..., expect_version: _Optional[int] = ...) -> None: ...

class DeleteSecretIfUnchangedRequest(_message.Message):
    __slots__ = ("name", "expect_version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    EXPECT_VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    expect_version: int
    def __init__(self, name: _Optional[str] = ..., expect_version: _Optional[int] = ...) -> None: ...

class UndeleteSecretRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class UndeleteSecretResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StageSecretVersionRequest(_message.Message):
    __slots__ = ("name", "value", "expect_current", "target")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    EXPECT_CURRENT_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    name: str
    value: bytes
    expect_current: int
    target: str
    def __init__(self, name: _Optional[str] = ..., value: _Optional[bytes] = ..., expect_current: _Optional[int] = ..., target: _Optional[str] = ...) -> None: ...

class StageSecretVersionIfCurrentRequest(_message.Message):
    __slots__ = ("name", "value", "expect_current", "target")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    EXPECT_CURRENT_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    name: str
    value: bytes
    expect_current: int
    target: str
    def __init__(self, name: _Optional[str] = ..., value: _Optional[bytes] = ..., expect_current: _Optional[int] = ..., target: _Optional[str] = ...) -> None: ...

class StageSecretVersionResponse(_message.Message):
    __slots__ = ("name", "version", "created", "created_by")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    CREATED_BY_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    created: str
    created_by: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., created: _Optional[str] = ..., created_by: _Optional[str] = ...) -> None: ...

class PromoteSecretVersionRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class PromoteSecretVersionResponse(_message.Message):
    __slots__ = ("name", "version", "previous")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    previous: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., previous: _Optional[int] = ...) -> None: ...

class RotateSecretRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class RotateSecretResponse(_message.Message):
    __slots__ = ("name", "version", "previous", "resumed", "promoted_elsewhere", "expires")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    RESUMED_FIELD_NUMBER: _ClassVar[int]
    PROMOTED_ELSEWHERE_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    previous: int
    resumed: bool
    promoted_elsewhere: bool
    expires: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., previous: _Optional[int] = ..., resumed: _Optional[bool] = ..., promoted_elsewhere: _Optional[bool] = ..., expires: _Optional[str] = ...) -> None: ...

class DiscardPendingVersionRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DiscardPendingVersionResponse(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("prefix", "since_revision", "since_history")
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    SINCE_REVISION_FIELD_NUMBER: _ClassVar[int]
    SINCE_HISTORY_FIELD_NUMBER: _ClassVar[int]
    prefix: str
    since_revision: int
    since_history: str
    def __init__(self, prefix: _Optional[str] = ..., since_revision: _Optional[int] = ..., since_history: _Optional[str] = ...) -> None: ...

class ChangeEvent(_message.Message):
    __slots__ = ("name", "version", "kind", "revision", "history")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[ChangeEvent.Kind]
        VERSION_ADDED: _ClassVar[ChangeEvent.Kind]
        METADATA_CHANGED: _ClassVar[ChangeEvent.Kind]
        SECRET_DESTROYED: _ClassVar[ChangeEvent.Kind]
        RESYNC: _ClassVar[ChangeEvent.Kind]
    KIND_UNSPECIFIED: ChangeEvent.Kind
    VERSION_ADDED: ChangeEvent.Kind
    METADATA_CHANGED: ChangeEvent.Kind
    SECRET_DESTROYED: ChangeEvent.Kind
    RESYNC: ChangeEvent.Kind
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    kind: ChangeEvent.Kind
    revision: int
    history: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., kind: _Optional[_Union[ChangeEvent.Kind, str]] = ..., revision: _Optional[int] = ..., history: _Optional[str] = ...) -> None: ...
