"""Share patches on the Hugging Face Hub: push a verified patch folder, pull one into the HF cache.

Only the files a patch consists of are uploaded (manifest, payload, recipe, card, plots): never
forget-set text, checkpoints, or anything else that happens to sit in the folder.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import UnpatchError
from .patch import DELTA_FILE, LORA_CONFIG, LORA_FILE, MANIFEST, Patch, load_patch

UPLOAD = [MANIFEST, DELTA_FILE, LORA_FILE, LORA_CONFIG, "recipe.yaml", "README.md", "*.png"]
_HUB_REF = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+))?$")


def push(path: str | Path, repo: str, private: bool = False, revision: str | None = None, create_pr: bool = False,
         token: str | None = None) -> str:
    """Verify the patch, create the repo if needed and upload the patch files. Returns the commit URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    patch = load_patch(path)  # integrity: hashes, safetensors, finiteness; raises one-line errors
    if not _HUB_REF.match(repo) or "@" in repo:
        raise UnpatchError(f"--repo {repo!r}: give a Hub repo id as owner/name")
    api = HfApi(token=token)  # token=None: HF_TOKEN or the `hf auth login` token, as huggingface_hub finds it
    try:
        api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo, branch=revision, exist_ok=True)
        info = api.upload_folder(folder_path=str(patch.path), repo_id=repo, revision=revision, create_pr=create_pr,
                                 allow_patterns=UPLOAD, commit_message=f"unpatch: {patch.name} ({patch.kind}, id {patch.patch_id[:12]})")
    except HfHubHTTPError as e:
        raise UnpatchError(f"push to {repo}: the Hub refused ({str(e).splitlines()[0]}); check `hf auth login` and the repo name") from e
    except OSError as e:
        raise UnpatchError(f"push to {repo}: cannot reach the Hub ({e}); check the network") from e
    return str(getattr(info, "commit_url", info))


def pull(ref: str, token: str | None = None) -> Path:
    """Download `owner/name[@revision]` into the HF cache (or find it there when HF_HUB_OFFLINE=1)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    m = _HUB_REF.match(ref)
    if not m:
        raise UnpatchError(f"{ref!r}: not a Hub patch id; give owner/name or owner/name@revision")
    try:
        return Path(snapshot_download(m["repo"], revision=m["rev"], allow_patterns=UPLOAD, token=token))
    except LocalEntryNotFoundError as e:
        raise UnpatchError(f"patch {ref!r}: not in the local Hugging Face cache and the Hub cannot be reached; "
                           "connect, or pull it once while online") from e
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise UnpatchError(f"patch {ref!r}: cannot be fetched from the Hub ({str(e).splitlines()[0]})") from e


def resolve_patch(ref: str, allow_pickle: bool = False) -> Patch:
    """A patch from a local folder, or from the Hub (cache first) when `ref` looks like owner/name."""
    if Path(ref).expanduser().exists() or not _HUB_REF.match(ref):
        return load_patch(Path(ref).expanduser(), allow_pickle=allow_pickle)
    return load_patch(pull(ref), allow_pickle=allow_pickle)
