"""``privlora attack trace``: the adapter owner's side of fingerprints. Given a suspect adapter (a
clone found in the wild), the artifact it was cloned from and the accounts database, say which
account's fingerprint it carries.

For each site the suspect's residual ``R = W_suspect - W_served`` (the served map, integer
weights and output scales as the server computes it) is projected on each account's rank-1 term
``F = diag(out_scale) dB A_hat`` (``server/fingerprints.py``), all sites together. The same
projection on many fingerprints from fresh random secrets, which the suspect cannot carry, gives
the null distribution: an account is named when its z-score's p-value, corrected for the number
of accounts tried (Bonferroni), is below ``alpha``.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from privlora.backends.pll import Fingerprint, PLLParams, mark_offset
from privlora.core.artifact import CLIENT, CRYPTO, SERVER, ArtifactError, load_bundle, read_server_program
from privlora.core.types import PLLSite, groups_from_rounds
from privlora.errors import PrivloraError
from privlora.files import read_json
from privlora.models.lora import LoraAdapter, LoraSite, read_adapter
from privlora.server.fingerprints import FingerprintKey, Suspect, account_fingerprint, normal_tail

MARKED_BACKENDS = ("bfv", "pads")  # the backends whose servers add fingerprints
NULL_DRAWS = 200
SPAN_TOLERANCE = 1e-6  # singular values of a suspect's A below this fraction of the largest are padding
ALPHA = 0.01


@dataclass(frozen=True)
class ServedSite:
    """One site as the server computes it: integer A_hat [r, d_in], B_hat [d_out, r], and the
    client's output scales [d_out] (delta = out_scale * B_hat A_hat x)."""

    site: PLLSite
    a_hat: np.ndarray
    b_hat: np.ndarray
    out_scale: np.ndarray

    @property
    def weight(self) -> np.ndarray:
        return self.out_scale[:, None] * (self.b_hat.astype(np.float64) @ self.a_hat.astype(np.float64))


@dataclass(frozen=True)
class ServedAdapter:
    sites: dict[str, ServedSite]
    params: PLLParams
    modulus: int


def served_adapter(artifact: str | Path) -> ServedAdapter:
    """Every site's served weights, from the artifact's server bundle and client parameters."""
    server = load_bundle(artifact, SERVER)
    backend = server.manifest["backend"]
    if backend["name"] not in MARKED_BACKENDS:
        raise PrivloraError(f"{artifact} is a {backend['name']} build; fingerprints are added by "
                            f"{' and '.join(MARKED_BACKENDS)} servers only")
    tensors = read_server_program(server)
    scales = read_json(load_bundle(artifact, CLIENT).path(CRYPTO), ArtifactError, "missing client parameters")["groups"]
    sites = {}
    for group in groups_from_rounds(server.manifest["rounds"]):
        a, b = tensors[f"{group.key}.a_hat"].astype(np.int64), tensors[f"{group.key}.b_hat"].astype(np.int64)
        out = np.asarray(scales[group.key]["out_scale"], dtype=np.float64)
        row = column = 0
        for site in group.sites:
            rows, columns = slice(row, row + site.d_out), slice(column, column + site.rank)
            sites[site.module] = ServedSite(site, a[columns], b[rows, columns], out[rows])
            row, column = row + site.d_out, column + site.rank
    return ServedAdapter(sites, PLLParams(**backend["parameters"]["pll"]), int(backend["parameters"]["plain_modulus"]))


def suspect_residuals(served: ServedAdapter, suspect_dir: str | Path) -> dict[str, np.ndarray]:
    """``(W_suspect - W_served P) A_hat^T`` [d_out, r] per site, ``P`` the projection on the
    inputs the suspect maps (the row space of its A): a clone fitted on rows that span less than
    d_in is zero off their span, and comparing it with the whole served map there would only add
    noise. ``A_hat^T``: all a rank-1 term in one column of B can correlate with."""
    suspect = read_adapter(suspect_dir)
    unknown = sorted(site.module for site in suspect.sites if site.module not in served.sites)
    if unknown or not suspect.sites:
        raise PrivloraError(f"{suspect_dir} does not adapt the artifact's sites (e.g. {unknown[:1]})")
    residuals = {}
    for site in suspect.sites:
        target = served.sites[site.module]
        weight = site.scaling * (site.lora_B.double() @ site.lora_A.double()).numpy()
        _, values, rows = np.linalg.svd(site.lora_A.double().numpy(), full_matrices=False)
        basis = rows[values > SPAN_TOLERANCE * values.max()].T  # [d_in, k]: the inputs the suspect maps (no padding)
        a_t = target.a_hat.T.astype(np.float64)
        residuals[site.module] = weight @ a_t - (target.weight @ basis) @ (basis.T @ a_t)
    return residuals


def _share(served: ServedAdapter, residuals: dict[str, np.ndarray], fingerprint: Fingerprint) -> float:
    """<R, F> / <F, F> over all sites. A site's term is rank 1, ``F = (out * d) a_j^T`` (``d`` the
    offset of column ``j`` of B_hat, ``a_j`` row ``j`` of A_hat), so ``<R, F> = (out * d) . (R A^T)[:, j]``
    and ``<F, F> = |out * d|^2 |a_j|^2``."""
    inner = energy = 0.0
    for module, projected in residuals.items():
        site, mark = served.sites[module], fingerprint.marks[module]
        offset = mark_offset(site.a_hat, site.b_hat, mark, fingerprint.strength, served.params, served.modulus)
        term = site.out_scale * offset[:, mark.column]
        inner += float(term @ projected[:, mark.column])
        energy += float(term @ term) * float(site.a_hat[mark.column].astype(np.float64) @ site.a_hat[mark.column])
    return inner / energy if energy else 0.0


def trace(artifact: str | Path, suspect_dir: str | Path, key: FingerprintKey, accounts: list[str],
          null_draws: int = NULL_DRAWS) -> list[Suspect]:
    """Every account's score against the suspect, most likely first."""
    if not key.enabled:
        raise PrivloraError("fingerprints are off in this accounts database (strength 0): there is nothing to trace; "
                            "turn them on with `privlora accounts fingerprints --strength S`")
    served = served_adapter(artifact)
    residuals = suspect_residuals(served, suspect_dir)
    sites = [served.sites[module].site for module in residuals]
    null = np.array([_share(served, residuals, account_fingerprint(
        FingerprintKey(secrets.token_bytes(32), key.strength), "null", sites)) for _ in range(null_draws)])
    centre, spread = float(null.mean()), float(null.std()) or 1e-30
    scores = []
    for account in accounts:
        carried = _share(served, residuals, account_fingerprint(key, account, sites))
        z = (carried - centre) / spread
        scores.append(Suspect(account, carried, z, normal_tail(z)))
    return sorted(scores, key=lambda s: -s.z)


def named(scores: list[Suspect], alpha: float = ALPHA) -> Suspect | None:
    """The account a suspect is attributed to: the top score, if significant after correction."""
    if scores and scores[0].p_value * len(scores) < alpha:
        return scores[0]
    return None


def marked_adapter(adapter: LoraAdapter, served: ServedAdapter, fingerprint: Fingerprint) -> LoraAdapter:
    """The float adapter plus an account's fingerprint terms, as one rank r+1 adapter (scaling 1):
    what the account is answered, without the backend's quantisation and error, so that the
    terms' effect on answers is measured alone."""
    sites = []
    for site in adapter.sites:
        served_site, mark = served.sites[site.module], fingerprint.marks[site.module]
        offset = mark_offset(served_site.a_hat, served_site.b_hat, mark, fingerprint.strength, served.params,
                             served.modulus)
        row = torch.from_numpy(served_site.a_hat[mark.column].astype(np.float32))[None]
        column = torch.from_numpy((served_site.out_scale * offset[:, mark.column]).astype(np.float32))[:, None]
        sites.append(LoraSite(site.module, torch.cat([site.lora_A, row]), torch.cat([site.lora_B * site.scaling, column], 1),
                              1.0))
    return replace(adapter, rank=adapter.rank + 1, alpha=float(adapter.rank + 1), scaling=1.0, sites=tuple(sites))
