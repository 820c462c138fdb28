"""Signed connection tokens: a ready-made handshake check for JWTs.

Server layer (layer 2 of docs/architecture.md). ``server.on_handshake(
JWTAuth(key, algorithms=["HS256"]))`` admits a WebSocket upgrade only with a
valid token, before the 101: a missing, malformed, badly signed, expired or
not yet valid token, a wrong audience or issuer, or an algorithm not in
``algorithms`` (``none`` never is) gets 401 with a short reason and never
reaches ``on_connect``. The claims become ``client.data``. With
``close_on_expiry`` (the default) a connection whose token's ``exp`` passes
is closed with :data:`~enjent.CloseCode.TOKEN_EXPIRED` (3005: reconnect
with a fresh token) by the keepalive sweep, within about a second.

Where the token may come from (``sources``, tried in this order):

- ``"query"``: ``?token=...`` (``query_parameter``);
- ``"header"``: ``Authorization: Bearer ...`` (what non-browser clients send);
- ``"cookie"``: the cookie ``cookie`` (``token``);
- ``"protocol"``: an offered subprotocol ``access_token.<JWT>`` — the one
  place a browser's ``new WebSocket(url, protocols)`` can carry a secret that
  does not end up in URLs and logs. The answer then names another offered
  subprotocol, or that one (a browser refuses a 101 that names none).

PyJWT is an optional dependency (``pip install 'enjent[jwt]'``, with
``cryptography`` for RS256/ES256 keys); it is imported when a
:class:`JWTAuth` is made.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..exceptions import HandshakeRejected
from ..handshake import is_upgrade_request, offered_subprotocols
from ..http11 import Request
from .policy import Accept

__all__ = ["PROTOCOL_PREFIX", "JWTAuth"]

#: The prefix of a subprotocol that carries a token (``access_token.<JWT>``).
PROTOCOL_PREFIX = "access_token."
_SOURCES = ("query", "header", "cookie", "protocol")


class JWTAuth:
    """A handshake hook that admits upgrades with a valid JWT (see the module docstring).

    ``key`` is the secret (HS*), a public key in PEM (RS*, ES*), or a mapping
    from key id (the token's ``kid`` header) to such keys — a key set, for
    rotation. ``algorithms`` must be given explicitly, of one family (HMAC
    or public-key, never both: a public key must not become an HMAC secret).
    ``audience`` and ``issuer``, when given, must match; ``leeway`` seconds
    of clock skew are allowed on ``exp``, ``nbf`` and ``iat``;
    ``require_exp`` refuses tokens without an expiry. Plain HTTP requests
    (not upgrades) pass untouched, so that a page at ``/`` loads.
    """

    def __init__(
        self,
        key: str | bytes | Mapping[str, str | bytes],
        *,
        algorithms: Sequence[str],
        audience: str | Iterable[str] | None = None,
        issuer: str | None = None,
        leeway: float = 0.0,
        require_exp: bool = False,
        sources: Sequence[str] = _SOURCES,
        query_parameter: str = "token",
        cookie: str = "token",
        close_on_expiry: bool = True,
    ) -> None:
        try:
            import jwt
        except ImportError:
            raise ImportError(
                "JWTAuth needs PyJWT: pip install 'enjent[jwt]' (with cryptography for RS/ES keys)"
            ) from None
        self._jwt = jwt
        #: PyJWT's errors, the most specific first, and the reason a client is told
        self._reasons: tuple[tuple[type[Exception], str], ...] = (
            (jwt.ExpiredSignatureError, "token expired"),
            (jwt.ImmatureSignatureError, "token not yet valid"),
            (jwt.InvalidAudienceError, "wrong audience"),
            (jwt.InvalidIssuerError, "wrong issuer"),
            (jwt.InvalidAlgorithmError, "algorithm not allowed"),
            (jwt.InvalidSignatureError, "bad signature"),
        )
        algorithms = list(algorithms)
        if not algorithms or any(a.lower() == "none" for a in algorithms):
            raise ValueError('give the algorithms explicitly, never "none" (e.g. ["HS256"])')
        families = {a[:2].upper() for a in algorithms}
        if "HS" in families and len(families) > 1:
            raise ValueError("do not mix HMAC (HS*) and public-key algorithms: one family only")
        unknown = set(sources) - set(_SOURCES)
        if not sources or unknown:
            raise ValueError(f"sources are among {', '.join(_SOURCES)}")
        if not leeway >= 0:
            raise ValueError("leeway must be >= 0 seconds")
        self.keys: Mapping[str, str | bytes] | None = key if isinstance(key, Mapping) else None
        self.key = None if isinstance(key, Mapping) else key
        self.algorithms = algorithms
        self.audience = (
            audience if audience is None or isinstance(audience, str) else list(audience)
        )
        self.issuer = issuer
        self.leeway = leeway
        self.require_exp = require_exp
        self.sources = tuple(sources)
        self.query_parameter = query_parameter
        self.cookie = cookie
        self.close_on_expiry = close_on_expiry

    def token_of(self, request: Request) -> tuple[str | None, str | None]:
        """(the token, the subprotocol that carried it) from the first source that has one."""
        for source in self.sources:
            if source == "query":
                token = request.query.get(self.query_parameter)
            elif source == "header":
                scheme, _, token = request.headers.get("Authorization", "").partition(" ")
                if scheme.lower() != "bearer":
                    token = ""
            elif source == "cookie":
                token = request.cookies.get(self.cookie)
            else:
                for offered in offered_subprotocols(request):
                    if offered.startswith(PROTOCOL_PREFIX):
                        return offered[len(PROTOCOL_PREFIX) :], offered
                token = None
            if token:
                return token.strip(), None
        return None, None

    def claims(self, token: str) -> dict[str, Any]:
        """The verified claims of ``token``; :class:`HandshakeRejected` (401) if it is not good."""
        jwt = self._jwt
        try:
            key = self.key
            if self.keys is not None:
                kid = jwt.get_unverified_header(token).get("kid")
                if not isinstance(kid, str) or kid not in self.keys:
                    raise HandshakeRejected(401, "unknown key id")
                key = self.keys[kid]
            options = {"require": ["exp"]} if self.require_exp else {}
            decoded: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=self.algorithms,
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
                options=options,
            )
        except HandshakeRejected:
            raise
        except jwt.MissingRequiredClaimError as exc:
            raise HandshakeRejected(401, f"token without {exc.claim}") from None
        except (jwt.InvalidTokenError, jwt.InvalidKeyError, ValueError, TypeError) as exc:
            # the most precise reason PyJWT's error classes give (they subclass each other)
            for kind, reason in self._reasons:
                if isinstance(exc, kind):
                    raise HandshakeRejected(401, reason) from None
            raise HandshakeRejected(401, "malformed token") from None
        return decoded

    def __call__(self, request: Request) -> Accept | None:
        if not is_upgrade_request(request):
            return None  # a page, a probe: not a WebSocket
        token, carrier = self.token_of(request)
        if not token:
            raise HandshakeRejected(401, "missing token")
        claims = self.claims(token)
        subprotocol = None
        if carrier is not None:  # answer with the app's subprotocol if one was offered
            others = [p for p in offered_subprotocols(request) if p != carrier]
            subprotocol = others[0] if others else carrier
        expires_at = None
        exp = claims.get("exp")
        if self.close_on_expiry and isinstance(exp, int | float) and not isinstance(exp, bool):
            expires_at = float(exp) + self.leeway
        return Accept(subprotocol=subprotocol, data=claims, expires_at=expires_at)
