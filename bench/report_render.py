"""The report as a list of parts (headings, paragraphs, tables, figures), written as Markdown,
self-contained HTML (figures embedded as base64 PNG) and LaTeX tables (booktabs rules)."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

PAGE_WIDTH_EM = 70
"""The width of the HTML page's column; figures fill it without a margin, and wider ones are
scaled down to it."""


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class Table:
    """A table of display strings.

    Attributes:
        name: file stem of its LaTeX file.
        caption: one line above the table.
        cells: the display strings; the index is not shown (put labels in a column).
        bold: where ``True``, the cell is marked (e.g. the best of its row); same shape as ``cells``.
    """

    name: str
    caption: str
    cells: pd.DataFrame
    bold: pd.DataFrame | None = None

    def bold_mask(self) -> pd.DataFrame:
        if self.bold is None:
            return pd.DataFrame(False, index=self.cells.index, columns=self.cells.columns)
        return self.bold.reindex(index=self.cells.index, columns=self.cells.columns, fill_value=False)


@dataclass(frozen=True)
class Figure:
    """A PNG figure; ``path`` is relative to the report's directory."""

    path: str
    caption: str


Part = Heading | Paragraph | Table | Figure


def _markdown_cell(text: str, bold: bool) -> str:
    text = str(text).replace("|", "\\|")
    return f"**{text}**" if bold and text else text


def markdown_table(table: Table) -> str:
    """A GitHub-flavoured Markdown table, marked cells in bold."""
    mask = table.bold_mask()
    header = "| " + " | ".join(_markdown_cell(c, False) for c in table.cells.columns) + " |"
    rule = "| " + " | ".join("---" for _ in table.cells.columns) + " |"
    lines = [header, rule]
    for index, row in table.cells.iterrows():
        lines.append("| " + " | ".join(_markdown_cell(row[c], mask.loc[index, c]) for c in table.cells.columns) + " |")
    return "\n".join(lines)


def to_markdown(title: str, parts: Sequence[Part]) -> str:
    """The report as Markdown; figures link their PNG files."""
    lines = [f"# {title}", ""]
    for part in parts:
        if isinstance(part, Heading):
            lines += ["#" * part.level + " " + part.text, ""]
        elif isinstance(part, Paragraph):
            lines += [part.text, ""]
        elif isinstance(part, Table):
            lines += [f"*{part.caption}*", "", markdown_table(part), ""]
        else:
            lines += [f"![{part.caption}]({part.path})", "", f"*{part.caption}*", ""]
    return "\n".join(lines)


def _styled(table: Table) -> pd.io.formats.style.Styler:
    mask = table.bold_mask()
    styles = mask.map(lambda marked: "font-weight: bold" if marked else "")
    return (
        table.cells.style.format(escape="html")
        .format_index(escape="html", axis=1)
        .apply(lambda _: styles, axis=None)
        .hide(axis="index")
    )


def _html_text(text: str) -> str:
    """Paragraph text: HTML-escaped, with Markdown's ``code`` spans kept as code."""
    pieces = html.escape(text).split("`")
    return "".join(f"<code>{piece}</code>" if i % 2 else piece for i, piece in enumerate(pieces))


def to_html(title: str, parts: Sequence[Part], directory: Path) -> str:
    """The report as one HTML page; figures are read from ``directory`` and embedded."""
    body = [f"<h1>{html.escape(title)}</h1>"]
    for part in parts:
        if isinstance(part, Heading):
            body.append(f"<h{part.level}>{html.escape(part.text)}</h{part.level}>")
        elif isinstance(part, Paragraph):
            body.append(f"<p>{_html_text(part.text)}</p>")
        elif isinstance(part, Table):
            body.append(f"<p><em>{_html_text(part.caption)}</em></p>")
            body.append(_styled(part).to_html())
        else:
            data = base64.b64encode((directory / part.path).read_bytes()).decode("ascii")
            body.append(
                f'<figure><img alt="{html.escape(part.caption)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{html.escape(part.caption)}</figcaption></figure>"
            )
    style = (
        f"body{{font-family:sans-serif;max-width:{PAGE_WIDTH_EM}em;margin:2em auto;padding:0 1em}}"
        "table{border-collapse:collapse;margin:0.5em 0 1.5em}"
        "th,td{border-bottom:1px solid #ccc;padding:0.25em 0.7em;text-align:right}"
        "th:first-child,td:first-child{text-align:left}figure{margin:1em 0}img{max-width:100%}"
    )
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{style}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


LATEX_SYMBOLS = {"±": r"$\pm$", "Δ": r"$\Delta$", "×": r"$\times$", "χ²": r"$\chi^2$", "α": r"$\alpha$"}


def to_latex(table: Table) -> str:
    """A booktabs ``tabular`` (``\\toprule``, ``\\midrule``, ``\\bottomrule``), marked cells bold.

    Cells and headers are LaTeX-escaped by pandas' Styler; the report's Unicode symbols
    become math. Needs ``\\usepackage{booktabs}``.
    """
    styles = table.bold_mask().map(lambda marked: "textbf:--rwrap" if marked else "")
    styler = (
        table.cells.style.format(escape="latex")
        .format_index(escape="latex", axis=1)
        .apply(lambda _: styles, axis=None)
        .hide(axis="index")
    )
    latex = styler.to_latex(hrules=True, column_format="l" + "r" * (len(table.cells.columns) - 1))
    for symbol, math in LATEX_SYMBOLS.items():
        latex = latex.replace(symbol, math)
    return f"% {table.caption}\n{latex}"


def write_latex_tables(parts: Sequence[Part], directory: Path) -> list[Path]:
    """One ``<name>.tex`` per table in ``directory``; returns the paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for part in parts:
        if isinstance(part, Table):
            path = directory / f"{part.name}.tex"
            path.write_text(to_latex(part))
            paths.append(path)
    return paths
