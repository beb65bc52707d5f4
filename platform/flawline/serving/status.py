"""Reading Ray Serve's state (the dashboard's ``get_serve_details`` answer) into plain rows, for
``flawline serve status`` and ``flawline status``."""

from __future__ import annotations

from typing import Any


def serve_running(details: dict[str, Any]) -> bool:
    """Whether Serve runs on the cluster (a controller or any application)."""
    return bool((details.get("controller_info") or {}).get("actor_id")) or bool(details.get("applications"))


def serve_address(details: dict[str, Any]) -> str | None:
    """The HTTP proxy's address, when Serve reports one."""
    http = details.get("http_options") or {}
    return f"http://{http['host']}:{http['port']}" if http.get("host") and http.get("port") else None


def serve_grpc_port(details: dict[str, Any]) -> int | None:
    """The gRPC proxy's port when Serve runs it (servicer functions configured), else None. Serve
    listens for gRPC on every interface ([::]), whatever the HTTP host."""
    grpc = details.get("grpc_options") or {}
    return int(grpc["port"]) if grpc.get("grpc_servicer_functions") and grpc.get("port") else None


def serve_summary(details: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per application and deployment: status and running / target replicas."""
    rows = []
    for name, application in sorted((details.get("applications") or {}).items()):
        for dep_name, dep in sorted((application.get("deployments") or {}).items()):
            replicas = dep.get("replicas") or []
            rows.append({"application": name, "app_status": application.get("status"),
                         "route_prefix": application.get("route_prefix"), "deployment": dep_name,
                         "status": dep.get("status"),
                         "replicas_running": sum(1 for r in replicas if r.get("state") == "RUNNING"),
                         "replicas_target": dep.get("target_num_replicas"),
                         "message": (dep.get("message") or application.get("message") or "").strip()})
        if not application.get("deployments"):
            rows.append({"application": name, "app_status": application.get("status"),
                         "route_prefix": application.get("route_prefix"), "deployment": "-", "status": "-",
                         "replicas_running": 0, "replicas_target": 0,
                         "message": (application.get("message") or "").strip()})
    return rows
