"""A researcher's own data in simulation: the folders are the sites, read in place, never written to."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from fedretrain.config import compose_config
from fedretrain.errors import ConfigError, DataValidationError
from simulation.federation import FederationSites, build_federation

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def digests(root: Path) -> dict[str, str]:
    files = (p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture
def own(tmp_path) -> Path:
    """A copy of the README's example data: two site folders (JSONL and CSV) and a validation set."""
    shutil.copytree(EXAMPLES / "sites", tmp_path / "mine" / "sites")
    shutil.copy(EXAMPLES / "validation.jsonl", tmp_path / "mine" / "validation.jsonl")
    return tmp_path / "mine"


def own_config(own: Path, *extra: str):
    return compose_config(
        [f"simulation.sites_dir={own / 'sites'}", f"validation_path={own / 'validation.jsonl'}", *extra]
    )


def test_the_folders_are_the_sites_and_not_a_byte_of_them_changes(own, tmp_path):
    # Prepare
    before = digests(own)

    # Execute
    fed = build_federation(own_config(own), tmp_path / "run" / "sites")

    # Assert: one site per folder, by its name; data read where it is, state kept beside the run.
    assert [s.site_id for s in fed.sites] == ["hospital-a", "hospital-b"]
    assert fed.validation_path == (own / "validation.jsonl").resolve()
    for site in fed.sites:
        assert Path(site.data_dir) == (own / "sites" / site.site_id).resolve()
        assert site.state_path == (tmp_path / "run" / "sites" / site.site_id / "state").resolve()
    assert fed.sites[1].train_path.suffix == ".csv"
    assert digests(own) == before
    # The simulation's node k is the k-th folder.
    sites = FederationSites(fed.root)
    assert [sites(SimpleNamespace(node_config={"partition-id": k}, node_id=k)).site_id for k in (0, 1)] == [
        "hospital-a",
        "hospital-b",
    ]
    # The same settings find the same federation again.
    assert build_federation(own_config(own), tmp_path / "run" / "sites").sites == fed.sites


def test_a_bad_file_is_named_with_its_line_before_anything_is_written(own, tmp_path):
    # Prepare: line 3 of hospital-a's training file misnames its field.
    train = own / "sites" / "hospital-a" / "train.jsonl"
    lines = train.read_text().splitlines()
    lines[2] = json.dumps({"txt": "typo"})
    train.write_text("\n".join(lines) + "\n")

    # Execute and assert
    with pytest.raises(DataValidationError, match=r"train\.jsonl:3"):
        build_federation(own_config(own), tmp_path / "fed")
    assert not list((tmp_path / "fed").glob("*/site.json"))


def test_own_sites_need_a_validation_set_and_site_folders(own, tmp_path):
    with pytest.raises(ConfigError, match="give validation_path"):
        build_federation(compose_config([f"simulation.sites_dir={own / 'sites'}"]), tmp_path / "a")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="has no site folders"):
        build_federation(own_config(own, f"simulation.sites_dir={empty}"), tmp_path / "b")
    (own / "sites" / "hospital-b" / "heldout.csv").unlink()
    with pytest.raises(ConfigError, match="hospital-b has no heldout.jsonl or heldout.csv"):
        build_federation(own_config(own), tmp_path / "c")


def test_a_federation_dir_that_fedretrain_did_not_make_is_refused_and_left_as_it_was(own, tmp_path):
    # Prepare: a researcher points federation_dir at a folder of their data (named like sites).
    mine = own / "sites"
    (mine / "site-00").mkdir()
    shutil.copy(mine / "hospital-a" / "train.jsonl", mine / "site-00" / "train.jsonl")
    before = digests(mine)

    # Execute and assert
    with pytest.raises(FileExistsError, match="not a federation fedretrain made"):
        build_federation(compose_config(["experiment=smoke"]), mine)
    assert digests(mine) == before
