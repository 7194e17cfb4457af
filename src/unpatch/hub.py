"""Share patches on the Hugging Face Hub: push a verified patch folder, pull one into the HF cache.

Only the files a patch consists of are uploaded (manifest, payload, recipe, card, plots, audit):
never forget-set text, checkpoints, or anything else that happens to sit in the folder. The list
is built from the files that exist, by exact name, so a new kind of file is private until it is
added here on purpose.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from .checks import HUB_REPO, own_file
from .errors import UnpatchError
from .patch.format import AUDIT_FILE, DELTA_FILE, LORA_CONFIG, LORA_FILE, MANIFEST, Patch
from .patch.store import load_patch

# audit.json (`unpatch audit`) and sweep.json (`unpatch sweep`) hold numbers and source names only, no texts
SHARED = [MANIFEST, "recipe.yaml", "README.md", AUDIT_FILE, "sweep.json"]  # beside the payload files
PLOTS = "*.png"  # top level only
# what a pull fetches: everything a push may have sent, nothing else that sits in the repo
PULL_PATTERNS = [MANIFEST, DELTA_FILE, LORA_FILE, LORA_CONFIG, *SHARED[1:], PLOTS]
_HUB_REF = re.compile(rf"^(?P<repo>{HUB_REPO})(?:@(?P<rev>[\w./-]+))?$")


def parse_ref(ref: str) -> tuple[str, str | None] | None:
    """`owner/name[@revision]` -> (repo, revision), or None when `ref` is not shaped like one."""
    m = _HUB_REF.match(ref)
    return (m["repo"], m["rev"]) if m else None


def files_to_push(patch: Patch) -> list[str]:
    """The top-level files of a verified patch that may leave the machine, by exact name. Each
    must be a regular file of the folder: a symlink pointing outside it is refused by name
    (checks.own_file), never followed."""
    folder = patch.path
    # fixed names, not the manifest's `files`: an edited manifest could list any file of the folder
    payload = [DELTA_FILE] if patch.kind == "delta" else [LORA_FILE, LORA_CONFIG]
    names = [MANIFEST, *payload, *SHARED[1:]]
    plots = sorted(p.name for p in folder.glob(PLOTS))  # glob lists links too: own_file judges each
    return [n for n in dict.fromkeys(names + plots) if own_file(folder, n) is not None]


_PNG = b"\x89PNG"
_MAX_SIDE_FILE = 50 << 20  # an audit, sweep or plot is kilobytes; anything huge is not ours


def stage(patch: Patch, files: list[str], into: Path) -> None:
    """Copy what will be uploaded into `into`, re-checked: the hashed files as they are (load_patch
    verified them), README.md rendered afresh from the manifest (never the file on disk, which no
    hash covers), audit/sweep JSON re-parsed (must be a JSON object) and plots PNG by signature."""
    from .patch.card import render_card
    from .patch.store import read_extras

    folder = patch.path
    for name in files:
        src = own_file(folder, name)
        if name == "README.md" or src is None:
            continue
        if name in (MANIFEST, DELTA_FILE, LORA_FILE, LORA_CONFIG, "recipe.yaml"):  # verified by load_patch
            try:
                os.link(src, into / name)  # no copy of a large payload; the bytes are the verified ones
            except OSError:  # another file system
                shutil.copyfile(src, into / name)
            continue
        if src.stat().st_size > _MAX_SIDE_FILE:
            raise UnpatchError(f"refusing to push {src}: {src.stat().st_size:,} bytes is too large for a {name}; remove it")
        data = src.read_bytes()
        if name.endswith(".json") and name not in (MANIFEST, LORA_CONFIG):
            _check_report(patch, src, name, data)
        if name.endswith(".png") and not data.startswith(_PNG):
            raise UnpatchError(f"refusing to push {src}: not a PNG image; regenerate or remove it")
        (into / name).write_bytes(data)
    (into / "README.md").write_text(render_card(patch, read_extras(into)))


def _check_report(patch: Patch, src: Path, name: str, data: bytes) -> None:
    """audit.json / sweep.json are not hashed: they must at least be reports about THIS patch (the
    audit names the patch id; the sweep's recommendation is the one the manifest recorded)."""
    try:
        doc = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        doc = None
    if not isinstance(doc, dict):
        raise UnpatchError(f"refusing to push {src}: not a JSON object as unpatch writes it; regenerate or remove it")
    if name == AUDIT_FILE and (doc.get("format") != "unpatch-audit" or (doc.get("patch") or {}).get("id") != patch.patch_id):
        raise UnpatchError(f"refusing to push {src}: not the audit of this patch (id {patch.patch_id[:12]}); "
                           f"run `unpatch audit {patch.path}` again or remove it")
    if name == "sweep.json":
        recorded = patch.manifest.metrics.get("sweep") or {}
        if not recorded or any(doc.get(k) != recorded.get(k) for k in ("recommended_scale", "scales")):
            raise UnpatchError(f"refusing to push {src}: not the sweep recorded in {MANIFEST} (its scales or recommendation "
                               f"differ); run `unpatch sweep {patch.path}` again or remove it")


def _verified(path: str | Path) -> Patch:
    """load_patch's checks (hashes, safetensors, finiteness) plus the ones `verify` adds, and the
    recipe copy must still be the recipe the manifest names: an edited recipe.yaml could carry
    anything, and it is published verbatim (also inside the card)."""
    try:
        patch = load_patch(path, allow_pickle=None)  # None: push has no --allow-pickle to suggest
        patch.updates()  # encodings and LoRA keys readable, as `unpatch verify` checks
    except UnpatchError as e:
        raise UnpatchError(f"refusing to push {path}: {e}") from e
    want = patch.manifest.recipe_sha256
    if want and patch.recipe_text is not None:
        got = hashlib.sha256(patch.recipe_text.encode()).hexdigest()  # as build hashed it (text, not bytes)
        if got != want:
            raise UnpatchError(f"refusing to push {path}: recipe.yaml differs from the recipe hash in {MANIFEST} "
                               "(edited after the build); restore it or rebuild the patch")
    return patch


def push(path: str | Path, repo: str, private: bool = False, revision: str | None = None, create_pr: bool = False,
         token: str | None = None) -> str:
    """Verify the patch, create the repo if needed and upload the patch files. Returns the commit
    (or pull request) URL."""
    from huggingface_hub import HfApi, constants, get_token
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    if parse_ref(repo) is None or "@" in repo:
        raise UnpatchError(f"--repo {repo!r}: give a Hub repo id as owner/name")
    if create_pr and revision:
        # huggingface_hub opens pull requests against the default branch only
        raise UnpatchError("--create-pr opens a pull request against main; drop --revision, or push to the branch without --create-pr")
    patch = _verified(path)
    files = files_to_push(patch)  # a symlink or special file is refused before anything else happens
    staging = tempfile.TemporaryDirectory(prefix="unpatch-push-")
    try:  # README rendered afresh, reports checked to be about this patch: all before any network
        stage(patch, [*files, "README.md"], Path(staging.name))
    except BaseException:
        staging.cleanup()
        raise
    files = sorted(set(files) | {"README.md"})
    try:
        if constants.is_offline_mode():
            raise UnpatchError(f"push to {repo}: HF_HUB_OFFLINE is set, so the Hub cannot be reached; unset it to push")
        if token is None and get_token() is None:  # HF_TOKEN, then the `hf auth login` file
            raise UnpatchError(f"push to {repo}: no Hugging Face token; run `hf auth login` or set HF_TOKEN")
        api = HfApi(token=token)  # token=None: HF_TOKEN, else the `hf auth login` token, as huggingface_hub finds it
        api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo, branch=revision, exist_ok=True)
        info = api.upload_folder(
            folder_path=staging.name, repo_id=repo, revision=revision, create_pr=create_pr,
            allow_patterns=[glob.escape(f) for f in files],  # exact names (fnmatch would read [ ] * ?)
            # a re-push may change kind (lora <-> delta) or drop a plot: remove the stale patch files
            delete_patterns=[DELTA_FILE, LORA_FILE, LORA_CONFIG, AUDIT_FILE, PLOTS],
            commit_message=f"unpatch: {patch.name} ({patch.kind}, id {patch.patch_id[:12]})")
    except LocalTokenNotFoundError as e:
        raise UnpatchError(f"push to {repo}: no Hugging Face token; run `hf auth login` or set HF_TOKEN") from e
    except HfHubHTTPError as e:
        raise UnpatchError(f"push to {repo}: the Hub refused ({_first_line(e)}); check `hf auth login` and the repo name") from e
    except Exception as e:
        if not _is_network_error(e):
            raise
        raise UnpatchError(f"push to {repo}: cannot reach the Hub ({_first_line(e)}); check the network") from e
    finally:
        staging.cleanup()
    return str(getattr(info, "pr_url", None) or getattr(info, "commit_url", info))


def pull(ref: str, token: str | None = None) -> Path:
    """Download `owner/name[@revision]` into the HF cache (or find it there when HF_HUB_OFFLINE=1)
    and return the snapshot folder. Only the patch files are fetched."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    parsed = parse_ref(ref)
    if parsed is None:
        raise UnpatchError(f"{ref!r}: not a Hub patch id; give owner/name or owner/name@revision")
    repo, rev = parsed
    try:
        from . import progress

        with progress.task(f"pull {ref}", log=False):  # heartbeat lines only: a cache hit or a refusal stays quiet  # hf_hub's own bars are silenced (progress.quiet_third_party)
            return Path(snapshot_download(repo, revision=rev, allow_patterns=PULL_PATTERNS, token=token))
    except LocalEntryNotFoundError as e:
        raise UnpatchError(f"patch {ref!r}: not in the local Hugging Face cache and the Hub cannot be reached "
                           "(HF_HUB_OFFLINE or no network); connect and pull it once, or give a local folder") from e
    except RevisionNotFoundError as e:
        raise UnpatchError(f"patch {ref!r}: the Hub repo has no revision {rev!r}; check the name after @") from e
    except RepositoryNotFoundError as e:
        raise UnpatchError(f"patch {ref!r}: no such Hub repo, or it is private/gated; check the id or `hf auth login`") from e
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise UnpatchError(f"patch {ref!r}: cannot be fetched from the Hub ({_first_line(e)})") from e
    except Exception as e:
        if not _is_network_error(e):
            raise
        raise UnpatchError(f"patch {ref!r}: cannot reach the Hub ({_first_line(e)}); check the network") from e


def resolve_patch(ref: str, allow_pickle: bool | None = False) -> Patch:
    """A patch from a local folder, or from the Hub (cache first) when `ref` looks like owner/name
    and no such local path exists."""
    local = Path(ref).expanduser()
    if local.exists() or parse_ref(ref) is None:
        return load_patch(local, allow_pickle=allow_pickle)
    try:
        folder = pull(ref)
    except UnpatchError as e:
        # `patches/gender` is both a relative path and a Hub id: say that neither was found
        raise UnpatchError(f"{e} (there is no local folder {ref!r} either)") from e
    return load_patch(folder, allow_pickle=allow_pickle)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _is_network_error(e: BaseException) -> bool:
    """Connection failures arrive as httpx transport errors (not OSError) in huggingface_hub >= 1."""
    if isinstance(e, OSError | TimeoutError):
        return True
    return any(c.__name__ in ("TransportError", "ConnectError", "TimeoutException", "NetworkError")
               for c in type(e).__mro__)
