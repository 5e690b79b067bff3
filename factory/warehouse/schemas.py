"""Generate schemas/: the recipe JSON Schema (from the pydantic models) and each table's Arrow schema.

Run `python -m factory.warehouse.schemas` after changing a model or table; a test fails while schemas/ is stale.
"""

from __future__ import annotations

import json
from pathlib import Path

from factory.config.recipe import Recipe
from factory.warehouse.tables import ALL_TABLES

SCHEMAS_DIR = Path(__file__).resolve().parents[2] / "schemas"


def rendered() -> dict[str, str]:
    """File name → content of every generated schema file."""
    files = {"recipe.schema.json": json.dumps(Recipe.model_json_schema(), indent=2, ensure_ascii=False) + "\n"}
    tables = {
        name: [{"name": f.name, "type": str(f.type), "nullable": f.nullable} for f in schema]
        for name, schema in ALL_TABLES.items()
    }
    files["tables.json"] = json.dumps(tables, indent=2) + "\n"
    return files


def write(directory: Path = SCHEMAS_DIR) -> list[Path]:
    """Write every schema file into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in rendered().items():
        path = directory / name
        path.write_text(text, encoding="utf-8")
        paths.append(path)
    return paths


if __name__ == "__main__":
    for p in write():
        print(f"wrote {p}")
