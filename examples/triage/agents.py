"""The triage agents: typed in and out; the model behind ``fast`` and ``smart`` comes from configuration.

``classify`` and ``sentiment`` are pydantic-ai Agents (their input arrives as a JSON prompt); ``decide`` is a
function that runs a pydantic-ai Agent through ``ctx.run`` and applies a refund policy to its answer; the rest
are plain functions that would call downstream services (counted with ``ctx.count_api_call()``, keyed by
``ctx.idempotency_key`` so a re-executed attempt is recognised there).
"""

from __future__ import annotations

import hashlib
import re
from decimal import Decimal
from typing import Literal

from pydantic import BaseModel, Field
from pydantic_ai import Agent

from calmrun.agents import StepContext

REFUND_LIMIT = Decimal("500")
APPROVAL_ABOVE = Decimal("200")
"""A refund above this waits for a person's approval (the workflow's ``approve_refund`` step)."""
"""Refunds above this go to a human, whatever the model decided."""


class Ticket(BaseModel):
    ticket_id: str
    customer: str = ""
    subject: str
    body: str


class Classification(BaseModel):
    category: Literal["billing", "technical", "account", "other"]
    priority: Literal["low", "normal", "high", "urgent"]
    summary: str = Field(max_length=200)


class Sentiment(BaseModel):
    tone: Literal["positive", "neutral", "negative", "hostile"]
    score: float = Field(ge=-1, le=1)
    legal_threat: bool = False


class Extraction(BaseModel):
    order_id: str | None = None
    amount: Decimal | None = None
    order_found: bool = False


class DecideInput(BaseModel):
    ticket: Ticket
    classification: Classification
    extraction: Extraction
    sentiment: Sentiment


class Decision(BaseModel):
    action: Literal["refund", "escalate", "approve"]
    reason: str
    refund_amount: Decimal | None = None
    needs_approval: bool = False


class RefundRequest(BaseModel):
    ticket_id: str
    order_id: str
    amount: Decimal = Field(gt=0)


class RefundReceipt(BaseModel):
    refund_id: str
    order_id: str
    amount: Decimal
    status: Literal["issued"] = "issued"


class Reversal(BaseModel):
    refund_id: str
    status: Literal["reversed"] = "reversed"


class NotifyInput(BaseModel):
    ticket_id: str
    customer: str = ""
    refund_id: str
    amount: Decimal


class Notification(BaseModel):
    message_id: str
    text: str


class EscalationInput(BaseModel):
    ticket_id: str
    priority: Literal["low", "normal", "high", "urgent"]
    reason: str


class Escalation(BaseModel):
    escalation_id: str
    queue: Literal["tier2", "legal"]
    paged: bool


class ApproveInput(BaseModel):
    ticket_id: str
    category: str
    summary: str


class Reply(BaseModel):
    ticket_id: str
    message: str
    resolved: bool = True


classify = Agent(
    output_type=Classification,
    name="classify",
    instructions=(
        "You triage customer support tickets. Classify the ticket given as JSON: its category, its priority "
        "and a one-sentence summary."
    ),
)

sentiment = Agent(
    output_type=Sentiment,
    name="sentiment",
    instructions=(
        "Read the customer's tone in the ticket given as JSON: positive, neutral, negative or hostile, "
        "a score from -1 to 1, and whether they threaten legal action."
    ),
)

decide_agent = Agent(
    output_type=Decision,
    name="decide",
    instructions=(
        "Decide what to do with a triaged support ticket: 'refund' when the customer asks for their money "
        "back for an identified order (give refund_amount), 'escalate' when a human must handle it "
        "(hostility, legal threats, unclear money questions), otherwise 'approve' to send the standard "
        "answer. Give a reason."
    ),
)

_ORDER = re.compile(r"\bORD-\d{4,8}\b", re.IGNORECASE)
_AMOUNT = re.compile(r"\$\s?(\d{1,3}(?:,\d{3})+(?:\.\d{2})?|\d+(?:\.\d{2})?)")


async def extract(ctx: StepContext, ticket: Ticket) -> Extraction:
    """Pull the order ID and amount out of the ticket and check the order exists (one order-service call)."""
    text = f"{ticket.subject}\n{ticket.body}"
    order = _ORDER.search(text)
    amount = _AMOUNT.search(text)
    order_id = order.group(0).upper() if order else None
    found = False
    if order_id is not None:
        ctx.count_api_call()  # the order service: GET /orders/{order_id}
        found = True
    value = Decimal(amount.group(1).replace(",", "")) if amount else None
    ctx.logger.info("extracted order=%s amount=%s", order_id, value)
    return Extraction(order_id=order_id, amount=value, order_found=found)


async def decide(ctx: StepContext, inp: DecideInput) -> Decision:
    """Ask the ``smart`` model, then hold it to policy: no refund without an order, none above the limit."""
    result = await ctx.run(decide_agent, inp.model_dump_json())
    decision = result.output
    if decision.action == "refund":
        amount = decision.refund_amount or inp.extraction.amount
        if not inp.extraction.order_found or amount is None:
            return Decision(
                action="escalate", reason=f"refund asked without a known order: {decision.reason}"
            )
        if amount > REFUND_LIMIT:
            return Decision(action="escalate", reason=f"refund of {amount} is above {REFUND_LIMIT}")
        return Decision(
            action="refund",
            reason=decision.reason,
            refund_amount=amount,
            needs_approval=amount > APPROVAL_ABOVE,
        )
    return decision.model_copy(update={"needs_approval": False})  # policy's call, never the model's


def _refund_id(run_id: str, ticket_id: str) -> str:
    return "rf_" + hashlib.sha256(f"{run_id}/{ticket_id}".encode()).hexdigest()[:12]


async def refund(ctx: StepContext, req: RefundRequest) -> RefundReceipt:
    """Issue the refund at the payment provider (idempotent per attempt)."""
    ctx.count_api_call()  # POST /refunds with Idempotency-Key: ctx.idempotency_key
    refund_id = _refund_id(ctx.run_id, req.ticket_id)
    ctx.logger.info("refund %s of %s on %s", refund_id, req.amount, req.order_id)
    return RefundReceipt(refund_id=refund_id, order_id=req.order_id, amount=req.amount)


async def reverse_refund(ctx: StepContext, req: RefundRequest) -> Reversal:
    """Compensation of ``refund``: it gets the refund step's input and cancels the refund it issued."""
    ctx.count_api_call()  # POST /refunds/{refund_id}/cancel
    refund_id = _refund_id(ctx.run_id, req.ticket_id)
    ctx.logger.info("reversed refund %s", refund_id)
    return Reversal(refund_id=refund_id)


async def notify(ctx: StepContext, inp: NotifyInput) -> Notification:
    """Tell the customer the refund is on its way (one e-mail service call)."""
    ctx.count_api_call()
    who = inp.customer or "there"
    text = f"Hi {who}, we refunded {inp.amount} (reference {inp.refund_id}) for ticket {inp.ticket_id}."
    return Notification(message_id=f"msg-{inp.refund_id}", text=text)


async def escalate(ctx: StepContext, inp: EscalationInput) -> Escalation:
    """Open a case for a human; legal threats go to the legal queue and page whoever is on call."""
    ctx.count_api_call()  # the case-management service
    legal = any(w in inp.reason.lower() for w in ("legal", "lawyer", "sue"))
    paged = legal or inp.priority == "urgent"
    if paged:
        ctx.count_api_call()  # the paging service
    digest = hashlib.sha256(ctx.idempotency_key.encode()).hexdigest()[:10]
    return Escalation(escalation_id=f"esc_{digest}", queue="legal" if legal else "tier2", paged=paged)


async def approve(ctx: StepContext, inp: ApproveInput) -> Reply:
    """Send the standard answer for the ticket's category."""
    answers = {
        "account": "You can reset your password from the sign-in page under 'Forgot password'.",
        "technical": "Thanks for the report; a fix is rolling out, and clearing your cache helps meanwhile.",
        "billing": "Your invoices are available under Settings > Billing.",
    }
    text = answers.get(inp.category, "Thanks for reaching out; here is what we found.")
    return Reply(ticket_id=inp.ticket_id, message=f"{text} ({inp.summary})")
