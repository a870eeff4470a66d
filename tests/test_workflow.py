"""The Pages workflow cannot run here: it is checked against GitHub's workflow schema (the
one check-jsonschema ships) and for what it must do: execute a profile of the registry, build
the book and its PDF with the README's TeX packages, upload and deploy the HTML."""
from pathlib import Path

import yaml

from dpskin_core.book.registry import load_registry
from dpskin_core.book.runner import TEX_PACKAGES

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / ".github" / "workflows" / "book.yml"


def test_the_workflow_is_valid_for_github():
    from check_jsonschema.cli.main_command import main

    try:
        main(["--builtin-schema", "vendor.github-workflows", str(WORKFLOW)])
    except SystemExit as e:
        assert e.code == 0, "the workflow does not validate against GitHub's schema"


def test_the_workflow_builds_and_publishes_a_registry_profile():
    wf = yaml.safe_load(WORKFLOW.read_text())
    on = wf.get("on", wf.get(True))  # YAML 1.1 reads the key `on` as True
    choice = on["workflow_dispatch"]["inputs"]["profile"]
    assert set(choice["options"]) == set(load_registry().profiles) and choice["default"] == "smoke"
    build = wf["jobs"]["build"]["steps"]
    runs = "\n".join(s.get("run", "") for s in build)
    assert 'dpskin book --profile "${{ inputs.profile }}" --pdf' in runs
    assert 'pip install -e ".[dev]"' in runs
    assert " ".join(TEX_PACKAGES) in runs.replace("\\\n", "").replace("  ", " ")
    uses = [s.get("uses", "").split("@")[0] for s in build]
    assert "actions/upload-pages-artifact" in uses
    assert any(s.get("with", {}).get("path") == "_build/html" for s in build)
    deploy = wf["jobs"]["deploy"]
    assert deploy["needs"] == "build"
    assert [s["uses"].split("@")[0] for s in deploy["steps"]] == ["actions/deploy-pages"]
    assert wf["permissions"] == {"contents": "read", "pages": "write", "id-token": "write"}


def test_every_place_installs_the_same_tex_packages():
    for f in (ROOT / "README.md", ROOT / ".ci" / "run", WORKFLOW):
        text = " ".join(f.read_text().replace("\\\n", " ").split())
        assert " ".join(TEX_PACKAGES) in text, f"{f.name} installs other TeX packages"
