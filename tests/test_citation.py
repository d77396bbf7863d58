"""CITATION.cff: valid Citation File Format 1.2.0 (tests/fixtures/cff-1.2.0-schema.json is the
format's JSON schema as cffconvert 2.0.0 ships it), and its preferred-citation is the paper
entry of the README's BibTeX."""
import json
import os
import re

import pytest

jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is in requirements.txt: pip install -r "
                                 "requirements.txt")
yaml = pytest.importorskip("yaml", reason="PyYAML is in requirements.txt: pip install -r requirements.txt")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def citation() -> dict:
    with open(os.path.join(ROOT, "CITATION.cff")) as f:
        return yaml.safe_load(f)


def readme_bibtex(key: str) -> dict:
    """The fields of entry `key` in the README's Citation section (one `name = {value}` a line)."""
    with open(os.path.join(ROOT, "README.md")) as f:
        section = f.read().split("\n## Citation\n", 1)[1].split("\n## ", 1)[0]
    entry = re.search(r"@\w+\{" + key + r",\n(.*?)\n\}", section, re.S).group(1)
    return dict(re.findall(r"^\s*(\w+)\s*=\s*\{(.*)\},?$", entry, re.M))


def test_citation_file_is_valid_cff():
    with open(os.path.join(ROOT, "tests", "fixtures", "cff-1.2.0-schema.json")) as f:
        validator = jsonschema.Draft7Validator(json.load(f), format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER)
    cff = citation()
    validator.validate(cff)
    assert cff["cff-version"] == "1.2.0" and cff["type"] == "software"
    assert not validator.is_valid({**cff, "type": "paper"})  # the schema does constrain it


def test_readme_bibtex_is_the_preferred_citation():
    paper, bib = citation()["preferred-citation"], readme_bibtex("liu2021adambnn")
    assert paper["type"] == "conference-paper"
    assert bib["title"] == paper["title"]
    assert bib["author"].split(" and ") == [f"{a['family-names']}, {a['given-names']}" for a in paper["authors"]]
    assert int(bib["year"]) == paper["year"]
    assert bib["booktitle"] == paper["collection-title"]
    assert bib["series"] == paper["journal"] and int(bib["volume"]) == paper["volume"]
    assert bib["publisher"] == paper["publisher"]["name"]
    assert bib["pages"] == f"{paper['start']}--{paper['end']}"
