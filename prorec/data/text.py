"""Item text for the semantic encoder: `title; category path` by default."""
from __future__ import annotations

from prorec.data.canonical import Item


def category_path(item: Item) -> str:
    """The item's first category path, e.g. "Beauty > Makeup > Face"."""
    return " > ".join(item.categories[0]) if item.categories else ""


def item_text(item: Item, template: str = "{title}; {categories}") -> str:
    """Render one item. Items without a title use their keywords in the title's place."""
    title = item.title.strip() if item.has_title else item.keywords.strip()
    text = template.format(title=title, categories=category_path(item), keywords=item.keywords.strip())
    return text.strip().strip(";").strip()

