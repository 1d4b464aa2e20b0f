"""Upload the dashboards to a running Grafana over its HTTP API (grafana-client).

``kvferry dashboards push --url URL --token T`` finds the folder by title (creating it when
missing), then saves every dashboard with ``overwrite: true``: the uid is stable, so a push
replaces the previous version instead of adding a copy. Any failure (unreachable, refused
token, an error answer) becomes one :class:`PushError` with a message meant for a person.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

DEFAULT_TIMEOUT_S = 10.0


class PushError(RuntimeError):
    """The push failed; the message says where and why."""


@dataclass(frozen=True)
class Pushed:
    """One saved dashboard: its uid and the URL Grafana answered with."""

    uid: str
    url: str


def _reason(e: Exception) -> str:
    """The useful end of a connection error ("Connection refused"), not urllib3's whole chain."""
    text = str(e)
    m = re.search(r"\[Errno -?\d+\] ([^'\")]+)|Failed to resolve '[^']+'|timed out", text)
    return (m.group(1) or m.group(0)) if m else text


def _explain(url: str, step: str, e: Exception) -> PushError:
    """A one-line reason from grafana-client's or the HTTP library's exception."""
    from grafana_client.client import GrafanaException

    if isinstance(e, GrafanaException):
        status = e.status_code
        if status == 401:
            return PushError(f"Grafana at {url} refused the credentials while {step} (401 Unauthorized): "
                             "check --token (a service account token with Editor rights)")
        if status == 403:
            return PushError(f"Grafana at {url} denied {step} (403 Forbidden): the token needs Editor rights")
        if status:
            return PushError(f"Grafana at {url} answered an error while {step}: {e.message}")
        return PushError(f"could not reach Grafana at {url} while {step}: {_reason(e)}")
    if isinstance(e, ValueError):  # a 2xx answer that is not JSON: not Grafana's API
        return PushError(f"{url} answered {step} with something other than Grafana's JSON API: {e}")
    return PushError(f"could not reach Grafana at {url} while {step}: {_reason(e)}")


def _folder_uid(api: Any, title: str) -> str:
    """The uid of the top-level folder titled ``title``, created if there is none."""
    for folder in api.folder.get_all_folders():
        if folder.get("title") == title:
            return str(folder["uid"])
    return str(api.folder.create_folder(title)["uid"])


def push(models: dict[str, dict[str, Any]], url: str, token: str | None, folder: str = "kvferry",
         timeout_s: float = DEFAULT_TIMEOUT_S) -> list[Pushed]:
    """Save every dashboard in ``models`` (uid -> JSON) to the Grafana at ``url``.

    ``token``: a service account or API token (sent as ``Authorization: Bearer``); ``None``
    uses ``user:password@`` from the URL if present. ``folder=""`` saves to General.
    """
    import niquests
    from grafana_client import GrafanaApi
    from grafana_client.client import GrafanaException

    api = GrafanaApi.from_url(url, credential=token, timeout=timeout_s)
    step = f"looking up folder {folder!r}"
    try:
        folder_uid = _folder_uid(api, folder) if folder else None
        pushed = []
        for uid, model in models.items():
            step = f"saving dashboard {uid}"
            body: dict[str, Any] = {"dashboard": model, "overwrite": True, "message": "kvferry dashboards push"}
            if folder_uid is not None:
                body["folderUid"] = folder_uid
            answer = api.dashboard.update_dashboard(body)
            pushed.append(Pushed(uid, str(answer.get("url", ""))))
    except (GrafanaException, niquests.exceptions.RequestException, ValueError) as e:
        raise _explain(url, step, e) from e
    return pushed
