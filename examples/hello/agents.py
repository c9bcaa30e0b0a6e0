from pydantic import BaseModel
from pydantic_ai import Agent

from calmrun import StepContext


class Person(BaseModel):
    name: str


class Greeting(BaseModel):
    text: str


class Review(BaseModel):
    polite: bool
    note: str


reviewer = Agent(output_type=Review, instructions="Is this greeting polite? Say why in a few words.")


async def greet(ctx: StepContext, person: Person) -> Greeting:
    ctx.logger.info("greeting %s", person.name)  # the log record carries run_id, step and attempt
    return Greeting(text=f"Hello, {person.name}!")


async def review(ctx: StepContext, greeting: Greeting) -> Review:
    result = await ctx.run(reviewer, greeting.text)  # runs on the step's model alias, usage recorded
    return result.output
