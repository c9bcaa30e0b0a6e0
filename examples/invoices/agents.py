"""The invoice reconciliation agents, scripted: deterministic functions over a small ledger.

Each would be a model call or a ledger lookup in a real deployment; here they decide from the data so the
example runs anywhere (``make demo-invoices``, ``tests/workflow/test_kinds_broker.py``).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any, Literal

from pydantic import BaseModel

from calmrun.agents import StepContext

LEDGER: dict[str, Decimal] = {
    "paper": Decimal("4.50"),
    "toner": Decimal("89.00"),
    "stapler": Decimal("12.00"),
}
"""Agreed unit prices by SKU."""
REJECT_ABOVE = Decimal("10000")


class Line(BaseModel):
    sku: str
    qty: int
    unit_price: Decimal


class Invoice(BaseModel):
    invoice_id: str
    lines: list[Line]


class Lines(BaseModel):
    lines: list[Line]


async def extract(ctx: StepContext, invoice: Invoice) -> Lines:
    return Lines(lines=invoice.lines)


class MatchInput(BaseModel):
    item: Line
    index: int
    vendor: str


class Match(BaseModel):
    index: int
    sku: str
    amount: Decimal
    matched: bool
    reason: str = ""


async def match_line(ctx: StepContext, m: MatchInput) -> Match:
    agreed = LEDGER.get(m.item.sku)
    amount = m.item.unit_price * m.item.qty
    if agreed is None:
        return Match(index=m.index, sku=m.item.sku, amount=amount, matched=False, reason="not in the ledger")
    if agreed != m.item.unit_price:
        why = f"billed {m.item.unit_price}, agreed {agreed}"
        return Match(index=m.index, sku=m.item.sku, amount=amount, matched=False, reason=why)
    return Match(index=m.index, sku=m.item.sku, amount=amount, matched=True)


class ReconcileInput(BaseModel):
    matches: list[Match | None]
    review: dict[str, Any] | None = None


class Reconciliation(BaseModel):
    total: Decimal
    disputed: list[int]
    summary: str
    draft: int


async def reconcile(ctx: StepContext, r: ReconcileInput) -> Reconciliation:
    found = [m for m in r.matches if m is not None]
    disputed = [m.index for m in found if not m.matched]
    total = sum((m.amount for m in found), Decimal(0))
    draft = 1 + int((r.review or {}).get("draft", 0))
    summary = f"{len(found)} lines, total {total}, {len(disputed)} disputed"
    if r.review:  # the reviewer asked for the reasons: the second draft gives them
        reasons = "; ".join(f"line {m.index}: {m.reason}" for m in found if not m.matched)
        summary += f" ({reasons})" if reasons else " (none)"
    return Reconciliation(total=total, disputed=disputed, summary=summary, draft=draft)


class ReviewInput(BaseModel):
    reconciliation: Reconciliation


class Review(BaseModel):
    score: float
    draft: int
    feedback: str


async def review(ctx: StepContext, r: ReviewInput) -> Review:
    rec = r.reconciliation
    explained = "(" in rec.summary
    score = 0.9 if explained else 0.5
    return Review(
        score=score, draft=rec.draft, feedback="" if explained else "give the reason of each dispute"
    )


class HandleInput(BaseModel):
    reconciliation: Reconciliation


class Handler(BaseModel):
    handler: Literal["pay", "dispute", "end:rejected"]
    why: str


async def choose_handler(ctx: StepContext, h: HandleInput) -> Handler:
    rec = h.reconciliation
    if rec.total > REJECT_ABOVE:
        return Handler(handler="end:rejected", why=f"total {rec.total} is over {REJECT_ABOVE}")
    if rec.disputed:
        return Handler(handler="dispute", why=f"lines {rec.disputed} do not match the ledger")
    return Handler(handler="pay", why="every line matches")


class Settle(BaseModel):
    invoice_id: str
    reconciliation: Reconciliation


class Receipt(BaseModel):
    invoice_id: str
    action: str
    key: str


async def pay(ctx: StepContext, s: Settle) -> Receipt:
    return Receipt(invoice_id=s.invoice_id, action=f"paid {s.reconciliation.total}", key=ctx.idempotency_key)


class Disputed(BaseModel):
    invoice_id: str
    lines: list[int]


class VendorAnswer(BaseModel):
    credited: bool
    credit_note: str


async def ask_vendor(ctx: StepContext, d: Disputed) -> VendorAnswer:
    """The child workflow's agent: the vendor credits a dispute of up to three lines."""
    if len(d.lines) <= 3:
        return VendorAnswer(credited=True, credit_note=f"CN-{d.invoice_id}-{'-'.join(map(str, d.lines))}")
    return VendorAnswer(credited=False, credit_note="")
