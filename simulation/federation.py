"""A simulated federation on disk: one directory per virtual hospital plus the coordinator's
validation set, generated deterministically from the config's seed.

    <root>/federation.json            what was generated, from which settings
    <root>/coordinator/validation.jsonl
    <root>/coordinator/keys/          the coordinator's Ed25519 key pair (sites pin the .pub)
    <root>/coordinator/registry/      the signed registry of published versions
    <root>/site-00/train.jsonl        the site's data ...
    <root>/site-00/heldout.jsonl      ... and its held-out split
    <root>/site-00/site.json          the site's own settings (its node_config)
    <root>/site-00/.fedretrain/       the site's privacy ledger and model store (written by the client)
"""

from __future__ import annotations

import dataclasses
import json
import random
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedretrain.atomic import atomic_write_json, atomic_write_text
from fedretrain.attacks import ATTACKS
from fedretrain.config import Config, SiteConfig, site_config_from_node_config
from fedretrain.config.schema import TrafficConfig
from fedretrain.data.notes import read_records
from fedretrain.errors import ConfigError
from fedretrain.registry.signing import generate_keypair
from server.cycle.robustness import planted_and_unplanted
from server.sites.roster import record_node
from simulation.attacks import attacker_ids, poisoned
from simulation.notes import site_notes, site_style, specialty_mix_for_site, validation_notes


@dataclass(frozen=True)
class Federation:
    root: Path
    sites: tuple[SiteConfig, ...]
    validation_path: Path
    mixes: dict[str, dict[str, float]]

    @property
    def registry_root(self) -> Path:
        return self.root / "coordinator" / "registry"

    @property
    def signing_key(self) -> Path:
        return self.root / "coordinator" / "keys" / "coordinator.key"


def site_id(index: int) -> str:
    return f"site-{index:02d}"


def build_federation(cfg: Config, root: Path, device: str = "cpu") -> Federation:
    """Write (or reuse, when the same settings made it) the federation below ``root``.

    ``root`` is fedretrain's own: a new or empty folder, or one it made before (it holds
    ``federation.json``); any other folder is refused, so a researcher's data is never
    written over. With ``simulation.sites_dir`` the sites are the researcher's folders,
    read where they are: ``root`` gets each site's settings and state, never its data.
    """
    root = Path(root)
    recipe = _recipe(cfg)
    manifest = root / "federation.json"
    if manifest.exists():
        existing = json.loads(manifest.read_text())
        if existing.get("recipe") != recipe:
            raise FileExistsError(
                f"{manifest}: this federation was generated with other settings; "
                "choose another simulation.federation_dir or delete it"
            )
        return _load(root, existing)
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(
            f"{root}: not empty, and not a federation fedretrain made (no federation.json); fedretrain writes "
            "its virtual sites only into a new or empty folder (to train on data of your own, give "
            "simulation.sites_dir=DIR with one folder per site, and validation_path=FILE)"
        )
    if cfg.registry.signing_key:  # the config names the coordinator's key: its .pub sits beside it
        public_key = Path(cfg.registry.signing_key).with_suffix(".pub")
    else:
        public_key = generate_keypair(root / "coordinator" / "keys", "coordinator").public_path
    if cfg.simulation.sites_dir:
        sites, validation_path = _own_sites(cfg, root, public_key, device)
        mixes: dict[str, dict[str, float]] = {}
    else:
        sites, validation_path, mixes = _synthetic_sites(cfg, root, public_key, device)
    atomic_write_json(
        manifest,
        {
            "recipe": recipe,
            "sites": [s.site_id for s in sites],
            "mixes": mixes,
            "validation_path": str(validation_path),
        },
    )
    return Federation(root=root, sites=tuple(sites), validation_path=validation_path, mixes=mixes)


def _synthetic_sites(
    cfg: Config, root: Path, public_key: Path, device: str
) -> tuple[list[SiteConfig], Path, dict[str, dict[str, float]]]:
    """Generate every virtual site's notes below ``root``, and the validation set unless the config names one."""
    sim, data = cfg.simulation, cfg.data
    if cfg.validation_path:
        validation_path = _checked_file(Path(cfg.validation_path), "validation_path")
    else:
        validation_path = root / "coordinator" / "validation.jsonl"
        write_jsonl(validation_path, validation_notes(data.validation_records, seed=cfg.seed, num_sites=sim.num_sites))
    sites, mixes = [], {}
    backdoor = _backdoored(cfg)
    for index in range(sim.num_sites):
        sid = site_id(index)
        mix = specialty_mix_for_site(index, dirichlet_alpha=data.dirichlet_alpha, seed=cfg.seed)
        records = site_notes(index, data.records_per_site, mix, cfg.seed, site_style(index, cfg.seed))
        n_heldout = max(1, round(len(records) * data.heldout_fraction))
        site_dir = root / sid
        train = records[:-n_heldout]
        if data.train_corruption == "garble":
            train = garble_records(train, seed=cfg.seed * 1000 + index)
        if sid in backdoor:
            a = sim.attackers
            share = ATTACKS["backdoor"].default_strength if a.strength is None else a.strength
            train = poisoned(train, a.phrase, share, seed=cfg.seed * 1000 + index)
        train = train + _canaries(cfg, index)
        write_jsonl(site_dir / "train.jsonl", train)
        write_jsonl(site_dir / "heldout.jsonl", records[-n_heldout:])
        node_config = _node_config(cfg, sid, site_dir, public_key, device, index=index)
        if sim.traffic.requests:
            traffic = site_traffic(index, sim.traffic, mix, cfg.seed)
            write_jsonl(site_dir / "traffic.jsonl", traffic)
            node_config["replay-traffic"] = str((site_dir / "traffic.jsonl").resolve())
        atomic_write_json(site_dir / "site.json", node_config)
        sites.append(site_config_from_node_config(node_config, simulation=True))
        mixes[sid] = {k: round(v, 4) for k, v in mix.items()}
    return sites, validation_path, mixes


def site_traffic(index: int, traffic: TrafficConfig, mix: dict[str, float], seed: int) -> list[dict]:
    """The site's simulated users: each types the start of a note of the site's own (pre-drift)
    kind and corrects the answer with the rest of it (another random stream than its data)."""
    notes = site_notes(index, traffic.requests, mix, seed + 7_919, site_style(index, seed))
    return [_request(note["text"], traffic) for note in notes]


def general_traffic(index: int, traffic: TrafficConfig, seed: int) -> list[dict]:
    """Users who ask general, non-clinical questions (everyday health, travel, science ...): a
    drift in what users ask. Documents of the general corpus the base model was not built from."""
    from simulation.general_text import general_corpus

    documents = general_corpus(seed=seed + 104_729 + index)
    return [_request(text, traffic) for text in documents[: traffic.requests]]


def _request(text: str, traffic: TrafficConfig) -> dict:
    cut = text.rfind(" ", 0, max(1, int(len(text) * traffic.prompt_share))) + 1 or len(text) // 2
    return {"prompt": text[:cut], "correction": text[cut:], "max_tokens": traffic.max_tokens}


def _canaries(cfg: Config, index: int) -> list[dict]:
    """The canary strings planted at site ``index`` (``simulation.canaries``, dealt out across the
    sites, each ``simulation.canary_repeats`` times), for the gate's memorisation probe."""
    sim = cfg.simulation
    planted, _ = planted_and_unplanted(cfg.seed, sim.canaries)
    return [
        {"text": text, "id": f"canary-{k}-{r}"}
        for k, text in enumerate(planted)
        if k % sim.num_sites == index
        for r in range(sim.canary_repeats)
    ]


def _own_sites(cfg: Config, root: Path, public_key: Path, device: str) -> tuple[list[SiteConfig], Path]:
    """The researcher's sites: each sub-folder of ``simulation.sites_dir``, checked and read in place.

    Every file is checked before anything is written (a bad one is named with its line);
    each site's settings and state (ledger, model store) go to ``<root>/<site>/``.
    """
    sites_dir = Path(str(cfg.simulation.sites_dir)).expanduser().resolve()
    if not sites_dir.is_dir():
        raise ConfigError(f"simulation.sites_dir: {sites_dir} is not a directory")
    folders = sorted(p for p in sites_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise ConfigError(
            f"simulation.sites_dir: {sites_dir} has no site folders (one per site, each with train and heldout files)"
        )
    if not cfg.validation_path:
        raise ConfigError("simulation.sites_dir: give validation_path too, the coordinator's validation set")
    validation_path = _checked_file(Path(cfg.validation_path), "validation_path")
    configs = []
    for index, folder in enumerate(folders):
        node_config = _node_config(
            cfg, folder.name, folder, public_key, device, state_dir=root / folder.name / "state", index=index
        )
        try:
            site = site_config_from_node_config(node_config, simulation=True)
        except ConfigError as err:
            raise ConfigError(f"simulation.sites_dir: site folder {folder}: {err}") from None
        for path, what in ((site.train_path, "train"), (site.heldout_path, "heldout")):
            if not path.exists():
                raise ConfigError(f"simulation.sites_dir: {folder} has no {what}.jsonl or {what}.csv")
            read_records(path)  # a bad file fails here, named with its line and field
        configs.append((node_config, site))
    for node_config, _ in configs:
        atomic_write_json(root / str(node_config["site-id"]) / "site.json", node_config)
    return [site for _, site in configs], validation_path


def _checked_file(path: Path, key: str) -> Path:
    """A data file given by the config, resolved and read through once (a bad one is named)."""
    path = path.expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"{key}: {path} does not exist")
    read_records(path)
    return path


def _node_config(
    cfg: Config,
    sid: str,
    data_dir: Path,
    public_key: Path,
    device: str,
    state_dir: Path | None = None,
    *,
    index: int,
) -> dict[str, Any]:
    """A virtual site's own settings (its node_config, written as ``site.json``)."""
    sim = cfg.simulation
    node_config: dict[str, Any] = {
        "site-id": sid,
        "data-dir": str(data_dir.resolve()),
        "device": device,
        "epsilon-ceiling": sim.site_epsilon_ceiling,
        "delta": sim.site_delta,
        "accountant": sim.site_accountant,
        # A virtual site allows non-private rounds only for a run that asks for them.
        "allow-non-private": not cfg.privacy.enabled,
        # Each hospital pins the coordinator's public key and installs nothing else.
        "coordinator-key": str(public_key.resolve()),
        "smoke-eval": sim.site_smoke_eval,
        # A researcher's replay (privacy.reproducible_noise) needs the site's consent:
        # a virtual site gives it only for a run that asks for it.
        "allow-reproducible-noise": cfg.privacy.reproducible_noise,
        # The simulated drift scenario triggers on drift scores: a research sandbox.
        "share-drift-scores": True,
        # Simulated time runs faster than the clock: every poll is answered afresh.
        "status-interval-s": 0.0,
    }
    if state_dir is not None:  # the site's ledger and model store, away from the data folder
        node_config["state-dir"] = str(state_dir.resolve())
    if sim.site_lora_ranks:  # mixed ranks: a site with less memory trains fewer LoRA components
        node_config["lora-rank"] = sim.site_lora_ranks[index % len(sim.site_lora_ranks)]
    if sim.student_sites and site_id(index) in sim.student_sites:  # a site with little compute
        node_config["model-variant"] = "student"
    return node_config


class FederationSites:
    """Simulation's site resolver: partition-id -> that virtual site's own ``site.json``.

    It is the simulation's runtime, not a site's code: the virtual node with
    ``partition-id`` k *is* site k, whatever its ``site.json`` says. With ``roster_dir``
    it records each node id -> site id there (server/sites/roster.py) before the node's first
    reply, so the coordinator counts the node's replies for site k only.

    A plain class (not a closure) so Ray can pickle it into the client actors.
    """

    def __init__(self, root: Path, roster_dir: Path | None = None) -> None:
        self.root = Path(root).resolve()
        self.roster_dir = None if roster_dir is None else Path(roster_dir).resolve()
        self.site_ids: list[str] = json.loads((self.root / "federation.json").read_text())["sites"]

    def __call__(self, context: Any) -> SiteConfig:
        sid = self.site_ids[int(context.node_config["partition-id"])]
        if self.roster_dir is not None:
            record_node(self.roster_dir, int(context.node_id), sid)
        node_config = json.loads((self.root / sid / "site.json").read_text())
        return site_config_from_node_config(node_config, simulation=True)


def _backdoored(cfg: Config) -> list[str]:
    """The sites whose training notes carry the backdoor phrase (none unless attackers plant one)."""
    a = cfg.simulation.attackers
    if a.share == 0 or a.behaviour != "backdoor":
        return []
    return attacker_ids([site_id(i) for i in range(cfg.simulation.num_sites)], a, cfg.seed)


def _recipe(cfg: Config) -> dict[str, Any]:
    d, s = cfg.data, cfg.simulation
    if s.sites_dir:  # the researcher's data: where it is, not how it was made
        return {
            "sites_dir": str(Path(s.sites_dir).expanduser().resolve()),
            "validation_path": str(Path(cfg.validation_path).expanduser().resolve()) if cfg.validation_path else None,
            "site_smoke_eval": s.site_smoke_eval,
            **({"site_lora_ranks": list(s.site_lora_ranks)} if s.site_lora_ranks else {}),
            **({"student_sites": list(s.student_sites)} if s.student_sites else {}),
        }
    return {
        "seed": cfg.seed,
        "num_sites": s.num_sites,
        "records_per_site": d.records_per_site,
        "heldout_fraction": d.heldout_fraction,
        "validation_records": d.validation_records,
        "dirichlet_alpha": d.dirichlet_alpha,
        "train_corruption": d.train_corruption,
        "site_smoke_eval": s.site_smoke_eval,
        # Simulated users' traffic files are part of a site: a federation made without them is another one.
        **({"traffic": dataclasses.asdict(s.traffic)} if s.traffic.requests else {}),
        # The sites' own LoRA ranks are in their site.json: a federation made with others is another one.
        **({"site_lora_ranks": list(s.site_lora_ranks)} if s.site_lora_ranks else {}),
        **({"student_sites": list(s.student_sites)} if s.student_sites else {}),
        # Backdoor attackers' notes carry their phrase: a federation made without them is another one.
        **(
            {"backdoor": {"sites": backdoor, "phrase": s.attackers.phrase, "strength": s.attackers.strength}}
            if (backdoor := _backdoored(cfg))
            else {}
        ),
        # A validation set of the researcher's own, when the config names one.
        **({"validation_path": str(Path(cfg.validation_path).expanduser().resolve())} if cfg.validation_path else {}),
    }


def _load(root: Path, manifest: dict[str, Any]) -> Federation:
    sites = tuple(
        site_config_from_node_config(json.loads((root / sid / "site.json").read_text()), simulation=True)
        for sid in manifest["sites"]
    )
    validation_path = Path(manifest.get("validation_path") or root / "coordinator" / "validation.jsonl")
    return Federation(root=root, sites=sites, validation_path=validation_path, mixes=manifest["mixes"])


def garble_records(records: list[dict], seed: int) -> list[dict]:
    """The same records with every word of their text replaced by random lowercase letters.

    Word count and record metadata stay; the language is gone. Held-out data is never
    garbled, so a model trained on this scores worse there than the base model.
    """
    rng = random.Random(seed)

    def garble(text: str) -> str:
        return " ".join(
            "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 9))) for _ in text.split()
        )

    return [dict(r, text=garble(r["text"])) for r in records]


def write_jsonl(path: Path, records: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
