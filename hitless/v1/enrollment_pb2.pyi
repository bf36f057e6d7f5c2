from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class EnrollRequest(_message.Message):
    __slots__ = ("gateway_id", "code", "csr_pem")
    GATEWAY_ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    gateway_id: str
    code: str
    csr_pem: bytes
    def __init__(self, gateway_id: _Optional[str] = ..., code: _Optional[str] = ..., csr_pem: _Optional[bytes] = ...) -> None: ...

class EnrollResponse(_message.Message):
    __slots__ = ("certificate_pem", "ca_pem", "root_metadata", "broker_user", "broker_password", "gateway_port")
    CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    CA_PEM_FIELD_NUMBER: _ClassVar[int]
    ROOT_METADATA_FIELD_NUMBER: _ClassVar[int]
    BROKER_USER_FIELD_NUMBER: _ClassVar[int]
    BROKER_PASSWORD_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_PORT_FIELD_NUMBER: _ClassVar[int]
    certificate_pem: bytes
    ca_pem: bytes
    root_metadata: bytes
    broker_user: str
    broker_password: str
    gateway_port: int
    def __init__(self, certificate_pem: _Optional[bytes] = ..., ca_pem: _Optional[bytes] = ..., root_metadata: _Optional[bytes] = ..., broker_user: _Optional[str] = ..., broker_password: _Optional[str] = ..., gateway_port: _Optional[int] = ...) -> None: ...
