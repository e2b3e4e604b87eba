"""``/api/v1/tokens``: API tokens, for admins only.

``GET /tokens`` lists them (never a secret), ``POST /tokens`` makes one and answers it once
(201), ``DELETE /tokens/{token_id}`` revokes one (404 if there is none). The same
:class:`edgeops.api.tokens.TokenService` calls as ``edgeops tokens create/list/revoke``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Path, status
from pydantic import BaseModel, ConfigDict, Field

from edgeops.api.auth import Principal, Role, admin
from edgeops.api.context import ApiContext, get_context
from edgeops.api.tokens import TokenView

router = APIRouter(prefix="/tokens", tags=["tokens"])

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,62}$"


class TokenCreate(BaseModel):
    """What a new token is for."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        min_length=1,
        max_length=63,
        pattern=NAME_PATTERN,
        description="who or what holds it: 1-63 letters, digits or ._@- (a letter or digit first)",
    )
    role: Role = Field(description="viewer (read only), operator (changes things) or admin")


class TokenOut(BaseModel):
    """A token as listed: never its secret."""

    id: str
    name: str
    role: Role
    created_at: datetime
    revoked_at: datetime | None

    @classmethod
    def of(cls, view: TokenView) -> TokenOut:
        return cls(
            id=view.id,
            name=view.name,
            role=view.role,
            created_at=view.created_at,
            revoked_at=view.revoked_at,
        )


class TokenCreated(TokenOut):
    """A new token, with the token itself: shown this once, never again."""

    token: str = Field(description="send as `Authorization: Bearer <token>`; not shown again")


Context = Annotated[ApiContext, Depends(get_context)]
Admin = Annotated[Principal, Depends(admin)]
TokenId = Annotated[str, Path(min_length=1, max_length=64, description="the token's id")]


@router.get("")
def list_tokens(ctx: Context, who: Admin) -> list[TokenOut]:
    """Every token, oldest first, revoked ones included; secrets are never shown."""
    return [TokenOut.of(view) for view in ctx.tokens.list()]


@router.post("", status_code=status.HTTP_201_CREATED)
def create_token(body: TokenCreate, ctx: Context, who: Admin) -> TokenCreated:
    """Make a token; the answer carries it once (only its hash is stored)."""
    view, token = ctx.tokens.create(body.name, body.role.value)
    return TokenCreated(**TokenOut.of(view).model_dump(), token=token)


@router.delete("/{token_id}")
def revoke_token(token_id: TokenId, ctx: Context, who: Admin) -> TokenOut:
    """Revoke a token: it stops working at once. Revoking twice is harmless; 404 if unknown."""
    return TokenOut.of(ctx.tokens.revoke(token_id))
