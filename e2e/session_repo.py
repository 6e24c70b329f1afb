"""The repository a scripted coding session works in: a small Python package with tests and a seeded bug.

``make_repo(path)`` writes ``stockroom`` (an inventory package: models, a store, pricing, CSV I/O, a
report and a CLI) with a ``unittest`` suite, as one git commit. ``Store.total_value`` ignores the
quantity, so ``tests/test_store.py`` has one failure until the session fixes it; the session then adds
``pricing.bulk_discount`` and a test file for it. Only the standard library and ``git`` are needed.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

BUG = "        return sum((item.unit_price for item in self._items.values()), Decimal(0))"
FIX = "        return sum((item.unit_price * item.quantity for item in self._items.values()), Decimal(0))"
PRICING_ANCHOR = "def apply_tax(amount: Decimal, rate: Decimal = DEFAULT_TAX) -> Decimal:"
BULK_FUNCTION = '''def bulk_discount(quantity: int, unit_price: Decimal) -> Decimal:
    """The line total with 5% off from 10 units and 10% off from 50 (marker: bulk-discount-v1)."""
    if quantity < 0:
        raise PricingError(f"negative quantity: {quantity}")
    total = unit_price * quantity
    if quantity >= 50:
        return round_money(total * Decimal("0.90"))
    if quantity >= 10:
        return round_money(total * Decimal("0.95"))
    return round_money(total)


'''
BULK_TEST = '''"""Tests for pricing.bulk_discount (written during the session)."""

import unittest
from decimal import Decimal

from stockroom.errors import PricingError
from stockroom.pricing import bulk_discount


class BulkDiscountTest(unittest.TestCase):
    def test_small_orders_pay_full_price(self):
        self.assertEqual(bulk_discount(3, Decimal("2.50")), Decimal("7.50"))

    def test_ten_units_get_five_percent(self):
        self.assertEqual(bulk_discount(10, Decimal("2.00")), Decimal("19.00"))

    def test_fifty_units_get_ten_percent(self):
        self.assertEqual(bulk_discount(50, Decimal("1.00")), Decimal("45.00"))

    def test_negative_quantity_is_refused(self):
        with self.assertRaises(PricingError):
            bulk_discount(-1, Decimal("1.00"))


if __name__ == "__main__":
    unittest.main()
'''

FILES: dict[str, str] = {
    "README.md": """# stockroom

A tiny inventory library: items with a SKU, a unit price and a quantity, a store that keeps them,
pricing helpers (tax, rounding, discounts), CSV import and export, and a plain-text stock report.

    python3 -m unittest discover -s tests -v

## Layout
- `stockroom/models.py`: the `Item` record and SKU validation
- `stockroom/store.py`: `Store`, the in-memory collection (add, remove, restock, totals)
- `stockroom/pricing.py`: money rounding, tax, discounts
- `stockroom/io.py`: CSV load and save
- `stockroom/report.py`: the stock report table
- `stockroom/cli.py`: `python3 -m stockroom.cli report FILE.csv`

Marker for readers: stockroom-readme-v1.
""",
    "pyproject.toml": """[project]
name = "stockroom"
version = "0.3.1"
description = "A tiny inventory library (stockroom-pyproject-v1)"
requires-python = ">=3.9"
dependencies = []

[project.scripts]
stockroom = "stockroom.cli:main"

[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"
""",
    "stockroom/__init__.py": '''"""stockroom: a tiny inventory library (stockroom-init-v1)."""

from .errors import PricingError, StockError, StockroomError
from .models import Item
from .store import Store

__all__ = ["Item", "PricingError", "StockError", "Store", "StockroomError"]
__version__ = "0.3.1"
''',
    "stockroom/errors.py": '''"""Errors raised by stockroom (stockroom-errors-v1)."""


class StockroomError(Exception):
    """Base class of every error this package raises."""


class StockError(StockroomError):
    """An item is missing, duplicated or would go below zero units."""


class PricingError(StockroomError):
    """A price, a rate or a quantity that cannot be priced."""


class FormatError(StockroomError):
    """A CSV row that does not parse."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(f"line {line}: {message}")
        self.line = line
''',
    "stockroom/models.py": '''"""The Item record (stockroom-models-v1)."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from decimal import Decimal

from .errors import PricingError, StockError

SKU_RE = re.compile(r"^[A-Z]{3}-\\d{4}$")


def check_sku(sku: str) -> str:
    """The SKU, upper-cased, when it looks like ABC-1234."""
    sku = sku.strip().upper()
    if not SKU_RE.match(sku):
        raise StockError(f"bad SKU {sku!r}: expected three letters, a dash and four digits")
    return sku


@dataclass(frozen=True)
class Item:
    """One stock line: what it is, what one unit costs, how many are on the shelf."""

    sku: str
    name: str
    unit_price: Decimal
    quantity: int = 0
    location: str = "main"

    def __post_init__(self) -> None:
        object.__setattr__(self, "sku", check_sku(self.sku))
        if self.unit_price < 0:
            raise PricingError(f"{self.sku}: negative unit price {self.unit_price}")
        if self.quantity < 0:
            raise StockError(f"{self.sku}: negative quantity {self.quantity}")

    @property
    def line_value(self) -> Decimal:
        """What the units on the shelf are worth."""
        return self.unit_price * self.quantity

    def with_quantity(self, quantity: int) -> Item:
        """A copy with another quantity (items are immutable)."""
        return replace(self, quantity=quantity)

    def label(self) -> str:
        """The short label printed on the shelf."""
        return f"{self.sku} {self.name} @ {self.unit_price}"
''',
    "stockroom/store.py": '''"""Store: the in-memory collection of items (stockroom-store-v1)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from decimal import Decimal

from .errors import StockError
from .models import Item, check_sku


class Store:
    """Items by SKU, with the operations a stock clerk needs."""

    def __init__(self, items: Iterable[Item] = ()) -> None:
        self._items: dict[str, Item] = {}
        for item in items:
            self.add(item)

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Item]:
        return iter(sorted(self._items.values(), key=lambda i: i.sku))

    def __contains__(self, sku: object) -> bool:
        return isinstance(sku, str) and sku.upper() in self._items

    def get(self, sku: str) -> Item:
        """The item with this SKU; StockError when there is none."""
        try:
            return self._items[check_sku(sku)]
        except KeyError:
            raise StockError(f"no item {sku}") from None

    def add(self, item: Item) -> None:
        """Add a new item; StockError when its SKU is taken."""
        if item.sku in self._items:
            raise StockError(f"duplicate SKU {item.sku}")
        self._items[item.sku] = item

    def remove(self, sku: str) -> Item:
        """Remove an item and return it."""
        item = self.get(sku)
        del self._items[item.sku]
        return item

    def restock(self, sku: str, units: int) -> Item:
        """Add units to an item (units may be negative for a sale, never below zero)."""
        item = self.get(sku)
        new = item.quantity + units
        if new < 0:
            raise StockError(f"{item.sku}: only {item.quantity} left, cannot take {-units}")
        self._items[item.sku] = item.with_quantity(new)
        return self._items[item.sku]

    def low_stock(self, threshold: int = 5) -> list[Item]:
        """Items with fewer than ``threshold`` units, fewest first."""
        low = [i for i in self._items.values() if i.quantity < threshold]
        return sorted(low, key=lambda i: (i.quantity, i.sku))

    def by_location(self) -> dict[str, list[Item]]:
        """Items grouped by where they are kept."""
        out: dict[str, list[Item]] = {}
        for item in self:
            out.setdefault(item.location, []).append(item)
        return out

    def total_units(self) -> int:
        """Units on every shelf."""
        return sum(item.quantity for item in self._items.values())

    def total_value(self) -> Decimal:
        """What the whole stock is worth (unit price times quantity, summed)."""
'''
    + BUG
    + "\n",
    "stockroom/pricing.py": '''"""Money helpers: rounding, tax, discounts (stockroom-pricing-v1)."""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

from .errors import PricingError

CENT = Decimal("0.01")
DEFAULT_TAX = Decimal("0.20")


def round_money(amount: Decimal) -> Decimal:
    """Round to the cent, halves up (the way the till does it)."""
    return amount.quantize(CENT, rounding=ROUND_HALF_UP)


def parse_price(text: str) -> Decimal:
    """A price from a string such as "3.50" or "$3.50"; PricingError otherwise."""
    cleaned = text.strip().lstrip("$").replace(",", "")
    try:
        value = Decimal(cleaned)
    except Exception:
        raise PricingError(f"not a price: {text!r}") from None
    if value < 0:
        raise PricingError(f"negative price: {text!r}")
    return round_money(value)


def percent_off(amount: Decimal, percent: Decimal) -> Decimal:
    """``amount`` less ``percent`` percent, rounded to the cent."""
    if not Decimal(0) <= percent <= Decimal(100):
        raise PricingError(f"discount out of range: {percent}%")
    return round_money(amount * (Decimal(100) - percent) / Decimal(100))


'''
    + PRICING_ANCHOR
    + '''
    """``amount`` plus tax at ``rate`` (0.20 is 20%), rounded to the cent."""
    if rate < 0:
        raise PricingError(f"negative tax rate: {rate}")
    return round_money(amount * (Decimal(1) + rate))
''',
    "stockroom/io.py": '''"""CSV import and export (stockroom-io-v1). Columns: sku,name,unit_price,quantity[,location]."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable

from .errors import FormatError, StockroomError
from .models import Item
from .pricing import parse_price

HEADER = ["sku", "name", "unit_price", "quantity", "location"]


def parse_rows(text: str) -> list[Item]:
    """Items from CSV text with a header row; FormatError names the bad line."""
    reader = csv.reader(io.StringIO(text))
    rows = list(reader)
    if not rows:
        return []
    header = [h.strip().lower() for h in rows[0]]
    if header[:4] != HEADER[:4]:
        raise FormatError(1, f"unexpected header {rows[0]}")
    items = []
    for n, row in enumerate(rows[1:], start=2):
        if not row or not "".join(row).strip():
            continue
        if len(row) < 4:
            raise FormatError(n, f"expected at least 4 columns, got {len(row)}")
        try:
            quantity = int(row[3])
        except ValueError:
            raise FormatError(n, f"quantity is not a number: {row[3]!r}") from None
        location = row[4].strip() if len(row) > 4 and row[4].strip() else "main"
        try:
            items.append(Item(row[0], row[1].strip(), parse_price(row[2]), quantity, location))
        except StockroomError as exc:
            raise FormatError(n, str(exc)) from None
    return items


def dump_rows(items: Iterable[Item]) -> str:
    """CSV text for ``items``, header first, sorted by SKU."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\\n")
    writer.writerow(HEADER)
    for item in sorted(items, key=lambda i: i.sku):
        writer.writerow([item.sku, item.name, f"{item.unit_price:.2f}", item.quantity, item.location])
    return out.getvalue()


def load(path: str) -> list[Item]:
    """Items from a CSV file."""
    with open(path, encoding="utf-8", newline="") as f:
        return parse_rows(f.read())


def save(path: str, items: Iterable[Item]) -> None:
    """Write items to a CSV file."""
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(dump_rows(items))
''',
    "stockroom/report.py": '''"""The plain-text stock report (stockroom-report-v1)."""

from __future__ import annotations

from .pricing import round_money
from .store import Store

COLUMNS = ("SKU", "Name", "Units", "Unit price", "Value")


def rows(store: Store) -> list[tuple[str, str, str, str, str]]:
    """One row per item, sorted by SKU."""
    return [
        (i.sku, i.name, str(i.quantity), f"{i.unit_price:.2f}", f"{round_money(i.line_value):.2f}")
        for i in store
    ]


def render(store: Store, title: str = "Stock report") -> str:
    """The report: a title, an aligned table, and the totals line."""
    body = rows(store)
    widths = [max(len(c), *(len(r[k]) for r in body)) if body else len(c) for k, c in enumerate(COLUMNS)]
    lines = [title, "=" * len(title), ""]
    lines.append("  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths)))
    lines.append("  ".join("-" * w for w in widths))
    for r in body:
        lines.append("  ".join(v.ljust(w) for v, w in zip(r, widths)))
    lines.append("")
    lines.append(f"{len(store)} items, {store.total_units()} units, worth {round_money(store.total_value()):.2f}")
    low = store.low_stock()
    if low:
        lines.append("Low stock: " + ", ".join(f"{i.sku} ({i.quantity})" for i in low))
    return "\\n".join(lines) + "\\n"
''',
    "stockroom/cli.py": '''"""Command line: ``python3 -m stockroom.cli report FILE.csv`` (stockroom-cli-v1)."""

from __future__ import annotations

import argparse
import sys

from . import io, report
from .errors import StockroomError
from .store import Store


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stockroom")
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("report", help="print the stock report of a CSV file")
    rep.add_argument("file")
    rep.add_argument("--title", default="Stock report")
    low = sub.add_parser("low", help="list items below a threshold")
    low.add_argument("file")
    low.add_argument("--threshold", type=int, default=5)
    args = parser.parse_args(argv)
    try:
        store = Store(io.load(args.file))
    except (OSError, StockroomError) as exc:
        print(f"stockroom: {exc}", file=sys.stderr)
        return 2
    if args.command == "report":
        sys.stdout.write(report.render(store, args.title))
    else:
        for item in store.low_stock(args.threshold):
            print(f"{item.sku}\\t{item.quantity}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
''',
    "tests/__init__.py": "",
    "tests/test_store.py": '''"""Tests for Store (stockroom-test-store-v1)."""

import unittest
from decimal import Decimal

from stockroom.errors import StockError
from stockroom.models import Item
from stockroom.store import Store


def sample() -> Store:
    return Store(
        [
            Item("ABC-0001", "bolt", Decimal("0.25"), 100),
            Item("ABC-0002", "nut", Decimal("0.10"), 3, "bin-2"),
            Item("XYZ-0100", "hinge", Decimal("4.00"), 2, "bin-2"),
        ]
    )


class StoreTest(unittest.TestCase):
    def test_len_and_contains(self):
        store = sample()
        self.assertEqual(len(store), 3)
        self.assertIn("abc-0001", store)
        self.assertNotIn("ABC-9999", store)

    def test_duplicate_sku_is_refused(self):
        with self.assertRaises(StockError):
            sample().add(Item("ABC-0001", "other bolt", Decimal("1"), 1))

    def test_restock_and_sell(self):
        store = sample()
        self.assertEqual(store.restock("ABC-0002", 7).quantity, 10)
        self.assertEqual(store.restock("ABC-0002", -4).quantity, 6)
        with self.assertRaises(StockError):
            store.restock("XYZ-0100", -3)

    def test_low_stock_fewest_first(self):
        self.assertEqual([i.sku for i in sample().low_stock()], ["XYZ-0100", "ABC-0002"])

    def test_by_location(self):
        groups = sample().by_location()
        self.assertEqual(sorted(groups), ["bin-2", "main"])
        self.assertEqual([i.sku for i in groups["bin-2"]], ["ABC-0002", "XYZ-0100"])

    def test_totals(self):
        store = sample()
        self.assertEqual(store.total_units(), 105)
        self.assertEqual(store.total_value(), Decimal("33.30"))

    def test_remove(self):
        store = sample()
        self.assertEqual(store.remove("ABC-0001").name, "bolt")
        self.assertEqual(len(store), 2)
        with self.assertRaises(StockError):
            store.get("ABC-0001")


if __name__ == "__main__":
    unittest.main()
''',
    "tests/test_pricing.py": '''"""Tests for pricing (stockroom-test-pricing-v1)."""

import unittest
from decimal import Decimal

from stockroom.errors import PricingError
from stockroom.pricing import apply_tax, parse_price, percent_off, round_money


class PricingTest(unittest.TestCase):
    def test_round_half_up(self):
        self.assertEqual(round_money(Decimal("2.675")), Decimal("2.68"))
        self.assertEqual(round_money(Decimal("2.674")), Decimal("2.67"))

    def test_parse_price(self):
        self.assertEqual(parse_price("$1,234.5"), Decimal("1234.50"))
        with self.assertRaises(PricingError):
            parse_price("twelve")
        with self.assertRaises(PricingError):
            parse_price("-1")

    def test_percent_off(self):
        self.assertEqual(percent_off(Decimal("80"), Decimal("25")), Decimal("60.00"))
        with self.assertRaises(PricingError):
            percent_off(Decimal("1"), Decimal("101"))

    def test_apply_tax(self):
        self.assertEqual(apply_tax(Decimal("10")), Decimal("12.00"))
        self.assertEqual(apply_tax(Decimal("10"), Decimal("0")), Decimal("10.00"))


if __name__ == "__main__":
    unittest.main()
''',
    "tests/test_io.py": '''"""Tests for CSV I/O and the report (stockroom-test-io-v1)."""

import unittest
from decimal import Decimal

from stockroom import io, report
from stockroom.errors import FormatError
from stockroom.store import Store

CSV = """sku,name,unit_price,quantity,location
ABC-0001,bolt,0.25,100,main
XYZ-0100,hinge,$4.00,2,bin-2
"""


class IoTest(unittest.TestCase):
    def test_round_trip(self):
        items = io.parse_rows(CSV)
        self.assertEqual([i.sku for i in items], ["ABC-0001", "XYZ-0100"])
        self.assertEqual(items[1].unit_price, Decimal("4.00"))
        self.assertEqual(io.parse_rows(io.dump_rows(items)), items)

    def test_bad_quantity_names_the_line(self):
        with self.assertRaises(FormatError) as ctx:
            io.parse_rows("sku,name,unit_price,quantity\\nABC-0001,bolt,1.00,many\\n")
        self.assertEqual(ctx.exception.line, 2)

    def test_report_lists_every_item(self):
        text = report.render(Store(io.parse_rows(CSV)))
        self.assertIn("ABC-0001", text)
        self.assertIn("2 items, 102 units", text)


if __name__ == "__main__":
    unittest.main()
''',
}


def make_repo(path: Path) -> None:
    """Write the package and its tests under ``path`` (emptied first) and commit them."""
    path.mkdir(parents=True, exist_ok=True)
    for rel, text in FILES.items():
        f = path / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    git = [
        "git",
        "-c",
        "user.name=e2e",
        "-c",
        "user.email=e2e@example.invalid",
        "-c",
        "init.defaultBranch=main",
    ]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "stockroom 0.3.1"]):
        subprocess.run([*git, *args], cwd=path, check=True, capture_output=True, timeout=30)
