"""Files on the Hugging Face hub as download sources.

``hf://datasets/OWNER/NAME[@REVISION]/PATH`` (``hf://models/...`` too; PATH may hold globs)
is listed through ``huggingface_hub``'s API at one commit: the revision is resolved once per
stage output and the commit kept in its ledger, so a resumed download never mixes two
commits of a moving branch. Each file is then fetched by the stage's own downloader
(``transfer``: Range resumption, retries) from the hub's resolve URL at that commit,
following the hub's redirect to its CDN, and checked against the LFS sha256 the hub lists,
or against the listed size for a file kept in git.

The endpoint is ``hf_endpoint``, else ``HF_ENDPOINT``, else huggingface.co, resolved once
where the stage runs and carried in every URL, so no Ray worker depends on its own
environment (``huggingface_hub`` reads ``HF_ENDPOINT`` once, at import). The token is
``huggingface_hub``'s (``HF_TOKEN``, or the file ``hf auth login`` writes) on the stage's
node; it is passed to the download tasks as an argument, sent only to the endpoint's host
(requests drops it on the redirect to another host) and never logged.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import posixpath
from dataclasses import dataclass, field
from urllib.parse import quote, unquote

import requests
from huggingface_hub import HfApi, get_token
from huggingface_hub.errors import (
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile

from pipeline.ledger import Ledger
from pipeline.secrets import scrub
from stages.download.config import DownloadConfig, DownloadError

log = logging.getLogger("meshline.download")

HF_SCHEME = "hf://"
DEFAULT_ENDPOINT = "https://huggingface.co"
DEFAULT_REVISION = "main"
COMMITS_UNIT = "hub-commits"
"""The ledger unit whose metadata keeps the commit each ``hf://`` repo revision resolved to."""
_REPO_TYPES = {"datasets": "dataset", "models": "model"}
_GLOB_CHARS = "*?["


def is_hub(location: str) -> bool:
    return location.startswith(HF_SCHEME)


def token_session(token: str | None) -> requests.Session:
    """A session that shows ``token`` to the hosts it asks, and to no host they redirect to
    (requests drops ``Authorization`` when a redirect changes the host)."""
    session = requests.Session()
    if token:
        session.headers["Authorization"] = f"Bearer {token}"
    return session


@dataclass(frozen=True)
class HubPath:
    """One ``hf://`` location, parsed."""

    kind: str
    """``datasets`` or ``models``, as the URL spells it."""
    repo_id: str
    """``OWNER/NAME``."""
    revision: str
    """A branch, tag or commit (``main`` when the URL names none)."""
    path: str
    """The path in the repo; may hold globs; empty for the whole repo."""

    @classmethod
    def parse(cls, location: str) -> HubPath:
        kind, _, rest = location.removeprefix(HF_SCHEME).partition("/")
        owner, _, rest = rest.partition("/")
        name, _, path = rest.partition("/")
        name, _, revision = name.partition("@")
        if kind not in _REPO_TYPES or not owner or not name:
            raise DownloadError(
                f"{location}: expected hf://datasets/OWNER/NAME[@REVISION]/PATH "
                "(or hf://models/...)"
            )
        # A revision with a slash (refs/pr/1) is written URL-encoded, as huggingface_hub does.
        return cls(kind, f"{owner}/{name}", unquote(revision) or DEFAULT_REVISION, path)

    @property
    def repo(self) -> str:
        """The repo at its revision, as written: the key of its commit in the ledger."""
        return f"{HF_SCHEME}{self.kind}/{self.repo_id}@{self.revision}"

    def pinned(self, commit: str, path: str) -> str:
        """``path`` of this repo at ``commit``, as an ``hf://`` URL (the manifest's source)."""
        return f"{HF_SCHEME}{self.kind}/{self.repo_id}@{commit}/{path}"

    def resolve_url(self, endpoint: str, commit: str, path: str) -> str:
        """The hub's download URL for ``path`` at ``commit``."""
        prefix = "datasets/" if self.kind == "datasets" else ""
        return f"{endpoint}/{prefix}{self.repo_id}/resolve/{commit}/{quote(path)}"


@dataclass(frozen=True)
class HubFile:
    """A file listed in a repo at a commit."""

    path: str
    size: int
    sha256: str | None
    """The LFS object's sha256; None for a file kept in git (checked by size)."""
    url: str
    """Where to fetch it: the resolve URL at the commit."""
    source: str
    """The pinned ``hf://`` URL."""


def _matches(pattern: str, path: str) -> bool:
    """Glob match segment by segment: ``*`` never crosses a ``/``, as in a local glob."""
    wanted, parts = pattern.split("/"), path.split("/")
    return len(wanted) == len(parts) and all(map(fnmatch.fnmatchcase, parts, wanted))


def _listed_directory(path: str) -> tuple[str, bool]:
    """The directory to list for ``path`` and whether the listing must recurse."""
    globbed = [i for i, c in enumerate(path) if c in _GLOB_CHARS]
    fixed = path[: globbed[0]] if globbed else path
    directory = posixpath.dirname(fixed)
    return directory, "/" in path[len(directory) + 1 :]


@dataclass
class Hub:
    """Where the hub is, the token to show it, and the commit each repo revision resolved to."""

    endpoint: str
    token: str | None = field(repr=False)
    commits: dict[str, str] = field(default_factory=dict)
    """``HubPath.repo`` -> commit sha, read from the ledger or resolved in this run."""

    @classmethod
    def open(cls, config: DownloadConfig, ledger: Ledger) -> Hub:
        endpoint = config.hf_endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT
        commits = {}
        if ledger.is_committed(COMMITS_UNIT):
            commits = ledger.record(COMMITS_UNIT)["metadata"]["commits"]
        return cls(endpoint.rstrip("/"), get_token(), dict(commits))

    def pin(self, ledger: Ledger) -> None:
        """Keep the commits resolved so far, so that a rerun lists the same files."""
        if self.commits and not ledger.is_committed(COMMITS_UNIT):
            with ledger.unit(COMMITS_UNIT) as unit:
                unit.metadata["commits"] = dict(sorted(self.commits.items()))

    def session(self) -> requests.Session:
        return token_session(self.token)

    def files(self, location: str) -> list[HubFile]:
        """Every file ``location`` names (one, or a glob's matches, in path order)."""
        hub_path = HubPath.parse(location)
        api = HfApi(endpoint=self.endpoint, token=self.token or False)
        try:
            commit = self._commit(api, hub_path)
            directory, recursive = _listed_directory(hub_path.path)
            entries = api.list_repo_tree(
                hub_path.repo_id,
                path_in_repo=directory or None,
                recursive=recursive,
                revision=commit,
                repo_type=_REPO_TYPES[hub_path.kind],
            )
            listed = [e for e in entries if isinstance(e, RepoFile)]
        except OfflineModeIsEnabled:
            raise DownloadError(
                f"{location}: HF_HUB_OFFLINE is set; unset it to list the hub"
            ) from None
        except RepositoryNotFoundError:
            raise DownloadError(
                f"{location}: no such repo at {self.endpoint}, or it is private or gated and "
                + ("the token (HF_TOKEN) may not read it" if self.token else "HF_TOKEN is not set")
            ) from None
        except RevisionNotFoundError:
            raise DownloadError(f"{location}: no revision {hub_path.revision!r}") from None
        except RemoteEntryNotFoundError:
            raise DownloadError(f"{location}: no such path at {hub_path.revision}") from None
        # huggingface_hub raises its HTTP client's own errors for a refused connection or a
        # timeout, and that client has changed between its releases: every other failure is
        # named here.
        except Exception as exc:
            reason = scrub(f"{type(exc).__name__}: {exc}".splitlines()[0], location)
            raise DownloadError(f"{location}: listing the repo failed ({reason})") from None
        pattern = hub_path.path
        chosen = sorted((e for e in listed if _matches(pattern, e.path)), key=lambda e: e.path)
        if not chosen:
            raise DownloadError(f"{location}: no files match at commit {commit}")
        return [
            HubFile(
                path=entry.path,
                size=entry.size,
                sha256=entry.lfs.sha256 if entry.lfs else None,
                url=hub_path.resolve_url(self.endpoint, commit, entry.path),
                source=hub_path.pinned(commit, entry.path),
            )
            for entry in chosen
        ]

    def _commit(self, api: HfApi, hub_path: HubPath) -> str:
        if hub_path.repo not in self.commits:
            info = api.repo_info(
                hub_path.repo_id,
                revision=hub_path.revision,
                repo_type=_REPO_TYPES[hub_path.kind],
            )
            self.commits[hub_path.repo] = info.sha
            log.info("download: %s is commit %s", hub_path.repo, info.sha)
        return self.commits[hub_path.repo]


def name_in(location: str, file_path: str, base_url: str | None) -> str:
    """The output name of ``file_path``, listed for ``location``: its path relative to
    ``base_url`` when that is a folder of the same repo, else its path in the repo."""
    if base_url is None or not is_hub(base_url):
        return file_path
    base = HubPath.parse(base_url)
    folder = base.path.strip("/")
    if base.repo_id != HubPath.parse(location).repo_id or not folder:
        return file_path
    return file_path.removeprefix(folder + "/")
