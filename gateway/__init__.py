"""An OpenAI-compatible HTTP gateway onto the modelnet network (see :mod:`.app`)."""

from .app import Gateway, Plan, PlanRunner, Routed
from .catalog import DISCOVERY_TAGS, Catalog, Target
from .config import Config, load_api_keys, parse_http_address
from .errors import ApiError, GatewayError, ListenError

__all__ = [
    "DISCOVERY_TAGS",
    "ApiError",
    "Catalog",
    "Config",
    "Gateway",
    "GatewayError",
    "ListenError",
    "Plan",
    "PlanRunner",
    "Routed",
    "Target",
    "load_api_keys",
    "parse_http_address",
]
