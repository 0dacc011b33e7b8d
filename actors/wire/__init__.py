# TEMPORARY shim until the wire package lands
from actors.codec import *  # noqa
from actors.codec import Header, OutOfOrderError, load_key  # noqa
from actors.envelope import Envelope  # noqa
from actors.links import LinkCodec, LinkInfo, choose_link  # noqa
CODECS = {"none": None, "fp16": None, "bf16": None, "int8": None}
