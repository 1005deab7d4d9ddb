"""The one artifact publisher: :class:`imagegen.report.Page` objects -> Prefect artifacts."""

from __future__ import annotations

from collections.abc import Iterable

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from imagegen.report import Page


def publish_pages(pages: Iterable[Page]) -> None:
    """Create each page as a Prefect artifact under its key (a new version of it)."""
    for page in pages:
        if page.kind == "table":
            create_table_artifact(key=page.key, table=page.content, description=page.description)
        elif page.kind == "markdown":
            create_markdown_artifact(key=page.key, markdown=page.content, description=page.description)
        else:
            raise ValueError(f"artifact page {page.key!r}: unknown kind {page.kind!r}")
