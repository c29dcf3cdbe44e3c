"""TF Serving's ModelService: GetModelStatus, and HandleReloadConfigRequest with its admin checks.

Config reloads change what the server serves, so they are admin calls: refused with
PERMISSION_DENIED from non-loopback peers (unless `allow_remote_admin`) and, with an admin token,
without call metadata `authorization: Bearer <token>`. The frontend passes the caller's peer
string and metadata; nothing here depends on gRPC's server API.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import urllib.parse
from typing import Mapping, Optional

import grpc
from tensorflow_serving.apis import get_model_status_pb2, model_management_pb2

from serving.monitoring import log_event
from serving.status import ServingError
from serving.versions import VersionManager

logger = logging.getLogger(__name__)

ADMIN_TOKEN_ENV = "XDCTR_ADMIN_TOKEN"  # --admin-token's default, kept out of process listings


def is_loopback_peer(peer: str) -> bool:
    """Whether a gRPC peer string ("ipv4:127.0.0.1:5000", "ipv6:[::1]:5000", "unix:...") is local."""
    kind, _, address = peer.partition(":")
    if kind in ("unix", "unix-abstract"):
        return True
    if kind not in ("ipv4", "ipv6"):
        return False
    host = urllib.parse.unquote(address.rsplit(":", 1)[0]).strip("[]")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


class ModelAdmin:
    """GetModelStatus and config reloads on `manager`'s models.

    `reload_refusal`: why config reloads by RPC are refused (FAILED_PRECONDITION), e.g. because
    this is one of several server processes and a reload would change only the one it reached.
    """

    def __init__(self, manager: VersionManager, admin_token: Optional[str] = None, allow_remote_admin: bool = False,
                 reload_refusal: Optional[str] = None):
        self.manager = manager
        self._admin_token = admin_token
        self._allow_remote_admin = allow_remote_admin
        self._reload_refusal = reload_refusal

    def admin_denial(self, peer: str, metadata: Mapping[str, object]) -> Optional[str]:
        """Why the caller at `peer` with call `metadata` may not use admin RPCs, or None when it may."""
        if not self._allow_remote_admin and not is_loopback_peer(peer):
            return (
                f"HandleReloadConfigRequest is accepted from loopback peers only; got {peer}. "
                "Start the server with --allow-remote-admin to accept other peers."
            )
        if self._admin_token is not None:
            expected = f"Bearer {self._admin_token}".encode()
            if not hmac.compare_digest(str(metadata.get("authorization", "")).encode(), expected):
                return "HandleReloadConfigRequest needs call metadata 'authorization: Bearer <admin token>'."
        return None

    def reload_config(self, request: model_management_pb2.ReloadConfigRequest, peer: str,
                      metadata: Mapping[str, object]) -> model_management_pb2.ReloadConfigResponse:
        """TF Serving's HandleReloadConfigRequest, after the admin checks; ServingError when refused."""
        denial = self.admin_denial(peer, metadata)
        if denial is not None:
            log_event(logger, logging.WARNING, "admin_denied", rpc="HandleReloadConfigRequest", peer=peer)
            raise ServingError(grpc.StatusCode.PERMISSION_DENIED, denial)
        if self._reload_refusal is not None:
            log_event(logger, logging.WARNING, "config_reload_refused", source="rpc", code="FAILED_PRECONDITION",
                      error=self._reload_refusal)
            raise ServingError(grpc.StatusCode.FAILED_PRECONDITION, self._reload_refusal)
        try:
            self.manager.reload_config(request.config)
        except ServingError as e:
            log_event(logger, logging.WARNING, "config_reload_refused", source="rpc", code=e.code.name, error=e.message)
            raise
        return model_management_pb2.ReloadConfigResponse()  # status: OK

    def get_model_status(
        self, request: get_model_status_pb2.GetModelStatusRequest
    ) -> get_model_status_pb2.GetModelStatusResponse:
        """States of one version, or of every version the server has seen (TF Serving's GetModelStatus).

        As in TF Serving, a `version_label` is not resolved: it asks for every version.
        """
        if not request.HasField("model_spec"):
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec")
        name = request.model_spec.name
        states = self.manager.version_states(name)
        if request.model_spec.HasField("version"):
            version = request.model_spec.version.value
            if version not in states:
                raise ServingError(grpc.StatusCode.NOT_FOUND, f"Could not find version {version} of model {name}")
            items = [(version, states[version])]
        else:
            if not states:
                raise ServingError(grpc.StatusCode.NOT_FOUND, f"Could not find any versions of model {name}")
            items = sorted(states.items(), reverse=True)  # TF Serving lists the highest first
        response = get_model_status_pb2.GetModelStatusResponse()
        for version, state in items:
            status = response.model_version_status.add(version=version, state=state.state)
            status.status.error_code = state.code.value[0]
            status.status.error_message = state.message
        return response
