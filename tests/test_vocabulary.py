"""The recipe schema's vocabulary (factory/config/vocabulary.py) agrees with the registries that implement it."""

from __future__ import annotations

from pathlib import Path

from factory.config.loading import load_recipe
from factory.config.vocabulary import BACKEND_ROLES, CUSTOM, LABELER_MODELS, PROTOCOL_FACTS, UNPREFILLED_MAX_TOKENS
from factory.core.keys import stable_hash
from factory.judge.protocols import PROTOCOLS, custom_protocol
from factory.labelers.registry import LABELERS
from factory.models.registry import BACKENDS
from factory.pipeline.run import Run

ROOT = Path(__file__).resolve().parent.parent


def test_backends_take_their_roles_from_the_vocabulary() -> None:
    assert list(BACKENDS) == list(BACKEND_ROLES)
    assert {name: entry.roles for name, entry in BACKENDS.items()} == BACKEND_ROLES


def test_protocol_facts_match_the_protocols() -> None:
    assert list(PROTOCOLS) == list(PROTOCOL_FACTS)
    for name, protocol in PROTOCOLS.items():
        facts = PROTOCOL_FACTS[name]
        assert protocol.uses_reference == facts.uses_reference, name
        assert protocol.default_max_tokens == facts.default_max_tokens, name
        assert bool(protocol.prefill) == facts.prefilled, name
        expected = UNPREFILLED_MAX_TOKENS if facts.prefilled else facts.default_max_tokens
        assert protocol.unprefilled().default_max_tokens == expected, name
    assert custom_protocol("{instruction} {output_a} {output_b}").name == CUSTOM


def test_labeler_sections_match_the_labelers() -> None:
    assert list(LABELERS) == list(LABELER_MODELS)
    for name, labeler in LABELERS.items():
        model = LABELER_MODELS[name]
        assert (labeler.model_field, labeler.role) == ((model.field, model.role) if model else (None, None)), name


def test_content_hash_is_the_runs_hash_of_the_recipe() -> None:
    paths = [ROOT / "recipes" / "quickstart.yaml", ROOT / "recipes" / "loop.yaml"]
    for path in paths:
        recipe = load_recipe(path).recipe
        dumped = recipe.model_dump(mode="json")
        assert recipe.content_hash == Run.hash_of(dumped) == stable_hash(dumped, 16)
