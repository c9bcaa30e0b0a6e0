"""Scripted models for the demo and the tests: FunctionModel functions, deterministic from the ticket text.

Configure them as model aliases (see ``models.yaml``)::

    models:
      fast: {model: "function:examples.triage.scripted:fast"}
      smart: {model: "function:examples.triage.scripted:smart"}

Rules: a ticket mentioning a refund is billing and is refunded; an angry one or one mentioning a lawyer is
escalated; any other is approved with the standard answer. They answer whatever structured output the agent
asks for: a call of the output tool (tool output mode), or JSON text (native or prompted mode).
"""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic_ai.messages import (
    ModelMessage,
    ModelRequest,
    ModelResponse,
    TextPart,
    ToolCallPart,
    UserPromptPart,
)
from pydantic_ai.models.function import AgentInfo

LEGAL = re.compile(r"\b(lawyers?|sue|suing|legal)\b")
UPSET = re.compile(r"\b(angry|furious|unacceptable|outraged)\b")


def fast(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    """The ``fast`` alias: classification and sentiment."""
    props = _output_properties(info)
    prompt = _prompt(messages)
    text = _ticket_text(prompt)
    if "category" in props:
        return _respond(info, _classify(text, _subject(prompt)))
    if "tone" in props:
        return _respond(info, _sentiment(text))
    return ModelResponse(parts=[TextPart("I can only classify tickets and read their tone.")])


def smart(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    """The ``smart`` alias: the decision (refund, escalate or approve)."""
    prompt = _prompt(messages)
    try:
        data = json.loads(prompt)
    except ValueError:
        data = {}
    ticket = data.get("ticket", {}) if isinstance(data, dict) else {}
    text = _ticket_text(json.dumps(ticket)) if ticket else prompt.lower()
    legal = bool(data.get("sentiment", {}).get("legal_threat")) if isinstance(data, dict) else False
    amount = data.get("extraction", {}).get("amount") if isinstance(data, dict) else None
    if legal or LEGAL.search(text):
        decision: dict[str, Any] = {"action": "escalate", "reason": "legal threat: needs the legal team"}
    elif UPSET.search(text):
        decision = {"action": "escalate", "reason": "customer is upset: a human should answer"}
    elif "refund" in text:
        decision = {"action": "refund", "reason": "customer asks for a refund", "refund_amount": amount}
    else:
        decision = {"action": "approve", "reason": "standard question"}
    return _respond(info, decision)


def _classify(text: str, subject: str) -> dict[str, Any]:
    if any(w in text for w in ("refund", "charge", "invoice", "billing", "payment")):
        category = "billing"
    elif any(w in text for w in ("password", "login", "log in", "account", "email address")):
        category = "account"
    elif any(w in text for w in ("error", "crash", "bug", "not working", "broken", "slow")):
        category = "technical"
    else:
        category = "other"
    if LEGAL.search(text) or any(w in text for w in ("urgent", "asap")):
        priority = "urgent"
    elif UPSET.search(text):
        priority = "high"
    else:
        priority = "normal"
    return {"category": category, "priority": priority, "summary": (subject or "support ticket")[:120]}


def _sentiment(text: str) -> dict[str, Any]:
    if LEGAL.search(text):
        return {"tone": "hostile", "score": -0.9, "legal_threat": True}
    if UPSET.search(text):
        return {"tone": "negative", "score": -0.6, "legal_threat": False}
    if any(w in text for w in ("thanks", "thank you", "great", "love")):
        return {"tone": "positive", "score": 0.6, "legal_threat": False}
    return {"tone": "neutral", "score": 0.0, "legal_threat": False}


def _respond(info: AgentInfo, data: dict[str, Any]) -> ModelResponse:
    if info.output_tools:
        return ModelResponse(parts=[ToolCallPart(info.output_tools[0].name, data)])
    return ModelResponse(parts=[TextPart(json.dumps(data))])


def _output_properties(info: AgentInfo) -> dict[str, Any]:
    if info.output_tools:
        schema = info.output_tools[0].parameters_json_schema
    elif info.model_request_parameters.output_object is not None:
        schema = info.model_request_parameters.output_object.json_schema
    else:
        return {}
    props = schema.get("properties", {})
    return props if isinstance(props, dict) else {}


def _prompt(messages: list[ModelMessage]) -> str:
    """The first user prompt of the conversation (retries add other parts, never a new prompt)."""
    for message in messages:
        if isinstance(message, ModelRequest):
            for part in message.parts:
                if isinstance(part, UserPromptPart) and isinstance(part.content, str):
                    return part.content
    return ""


def _subject(prompt: str) -> str:
    try:
        data = json.loads(prompt)
    except ValueError:
        return ""
    return str(data.get("subject", "")) if isinstance(data, dict) else ""


def _ticket_text(prompt: str) -> str:
    """Subject and body of a ticket given as JSON (or the prompt itself), lowercased."""
    try:
        data = json.loads(prompt)
    except ValueError:
        return prompt.lower()
    if not isinstance(data, dict):
        return prompt.lower()
    return f"{data.get('subject', '')}\n{data.get('body', '')}".lower()
