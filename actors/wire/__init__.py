"""The message layer (no Ray): framing and checksum, the codec registry, compression, AES-GCM, the
per-link policy and the `Envelope` stages `seal` and `open`.

    from actors.wire import Envelope, Header, LinkCodec, LinkInfo, choose_link, load_key
"""

from actors.wire.compress import COMPRESSORS, compressor_names
from actors.wire.crypto import load_key, new_key, subkey
from actors.wire.envelope import Envelope
from actors.wire.errors import (
    ChecksumError,
    DecryptionError,
    KeyConfigError,
    MessageError,
    OutOfOrderError,
    ReplayError,
    TruncatedMessageError,
)
from actors.wire.framing import ALIGN, CHECKSUM_SIZE, KINDS, PREFIX_SIZE, Header, pack, peek_header, unpack
from actors.wire.links import LinkCodec, LinkInfo, check_codec, check_compress, choose_link
from actors.wire.quant import (
    QUANTISERS,
    Quantiser,
    codec_names,
    decode_tensor,
    encode_tensor,
    int8_error_bound,
    register,
    unregister,
)

__all__ = [
    "ALIGN", "CHECKSUM_SIZE", "COMPRESSORS", "KINDS", "PREFIX_SIZE", "QUANTISERS", "ChecksumError",
    "DecryptionError", "Envelope", "Header", "KeyConfigError", "LinkCodec", "LinkInfo", "MessageError",
    "OutOfOrderError", "Quantiser", "ReplayError", "TruncatedMessageError", "check_codec", "check_compress",
    "choose_link", "codec_names", "compressor_names", "decode_tensor", "encode_tensor", "int8_error_bound",
    "load_key", "new_key", "pack", "peek_header", "register", "subkey", "unregister", "unpack",
]
