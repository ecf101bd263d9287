"""Signed, self-describing release bundles: an OpenSSF `model-signing` signature and an in-toto SLSA provenance.

Hashes alone cannot tell a rewritten bundle from a genuine one: whoever flips a byte can also rewrite lineage.json.
A signature made with a key the team holds can. `sign_bundle` signs every file of the bundle with an elliptic-curve
private key (PEM) through `model_signing` (key-based, offline); the signature, `model.sig`, is a Sigstore bundle
that model-signing's own CLI verifies (`model_signing verify key --public_key PUB --signature B/model.sig B`). Its
manifest lists every file, so a file added, removed or changed after signing fails verification.

`provenance_statement` is the lineage as an in-toto Statement with a SLSA v1 provenance predicate (subjects: every
bundled file's sha256; resolved dependencies: dataset files, base model weights, code commit; the params), for
supply-chain tools that read provenance rather than our lineage.json.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from qlora_pipeline.stages.contract.errors import InputError
from qlora_pipeline.stages.contract.runtime import REPO_ROOT

SIGNATURE = "model.sig"
PROVENANCE = "provenance.intoto.json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
SLSA_PROVENANCE = "https://slsa.dev/provenance/v1"
BUILD_TYPE = "https://github.com/qlora-pipeline/qlora-pipeline/release/v1"


def _public_key_pem(private_key: Path) -> bytes:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(Path(private_key).read_bytes(), password=None)
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def key_fingerprint(private_key: Path) -> str:
    """sha256 of the public key's PEM: what the model card names, so a verifier knows which key to ask for."""
    return hashlib.sha256(_public_key_pem(private_key)).hexdigest()


def check_signing_key(private_key: Path) -> None:
    """At prepare and release: the key exists and is an unencrypted elliptic-curve private key in PEM."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        key = serialization.load_pem_private_key(Path(private_key).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise InputError(
            f"release.signing_key {private_key} is not a readable, unencrypted PEM private key ({exc}); make one "
            "with `openssl ecparam -name prime256v1 -genkey -noout -out key.pem` or set release.signing_key: null"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise InputError(
            f"release.signing_key {private_key} is a {type(key).__name__}; model-signing signs with elliptic-curve "
            "keys (openssl ecparam -name prime256v1 -genkey -noout -out key.pem)"
        )


def signing_key_path(r: Any) -> Path | None:
    """release.signing_key as a path (relative to the checkout), checked; None when releases are unsigned."""
    if r.signing_key is None:
        return None
    key = Path(r.signing_key)
    key = key if key.is_absolute() else REPO_ROOT / key
    check_signing_key(key)
    return key


def sign_bundle(bundle: Path, private_key: Path) -> Path:
    """Sign every file of `bundle` (the signature itself excepted) into `bundle/model.sig`."""
    from model_signing import hashing, signing

    config = signing.Config().use_elliptic_key_signer(private_key=str(private_key))
    config.set_hashing_config(hashing.Config().set_ignored_paths(paths=[SIGNATURE], ignore_git_paths=False))
    config.sign(str(bundle), str(bundle / SIGNATURE))
    return bundle / SIGNATURE


def verify_signature(bundle: Path, public_key: Path) -> None:
    """InputError naming the problem unless `bundle/model.sig` is a valid signature, by the key of `public_key`,
    of exactly the files now in the bundle."""
    from model_signing import verifying

    if not (bundle / SIGNATURE).is_file():
        raise InputError(f"{bundle} has no {SIGNATURE}: it was released unsigned")
    try:
        verifying.Config().use_elliptic_key_verifier(public_key=str(public_key)).verify(
            str(bundle), str(bundle / SIGNATURE)
        )
    except Exception as exc:  # model-signing raises ValueError and library-specific errors alike
        raise InputError(f"the signature of {bundle} does not verify with {public_key}: {exc}") from None


def provenance_statement(
    files: dict[str, str], params: dict[str, Any], materials: dict[str, str], commit: str | None, release_id: str
) -> dict[str, Any]:
    """An in-toto v1 Statement whose subjects are the bundle's files and whose predicate is SLSA v1 provenance."""
    dependencies = [{"name": name, "digest": {"sha256": digest}} for name, digest in sorted(materials.items())]
    if commit:
        dependencies.append({"name": "code", "digest": {"gitCommit": commit}})
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": rel, "digest": {"sha256": digest}} for rel, digest in sorted(files.items())],
        "predicateType": SLSA_PROVENANCE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": params,
                "resolvedDependencies": dependencies,
            },
            "runDetails": {"builder": {"id": BUILD_TYPE}, "metadata": {"invocationId": release_id}},
        },
    }
