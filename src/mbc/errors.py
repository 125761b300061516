"""The one exception type users see: it says what went wrong and what to do about it."""


class MBCError(Exception):
    """A problem with the user's input, models or files, with a message that names the fix."""


class Unavailable(MBCError):
    """The bank's server cannot be reached or dropped the connection: the same call may work later."""


class NotFound(MBCError):
    """What was asked for (a stored document, by id) is not there."""


def check_texts(texts, what: str) -> list[str]:
    """``texts`` as a list of non-empty strings (documents, questions), or one line saying which is not."""
    if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
        raise MBCError(f"{what} must be given as a list of strings, got {type(texts).__name__}")
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise MBCError(f"{what} must be strings: item {index} is {type(text).__name__}")
        if not text.strip():
            raise MBCError(f"{what} must not be empty: item {index} is {text!r}")
        check_encodable(text, f"{what}: item {index}")
    return list(texts)


def check_encodable(text: str, where: str) -> str:
    """``text`` if it is valid Unicode; a lone surrogate (as JSON's "\\ud800" decodes to) is no
    character any tokenizer or file can hold, so it is named here rather than failing deep inside one."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise MBCError(
            f"{where} holds a lone surrogate ({text[error.start]!r} at character {error.start}), which is not text: "
            "remove it or replace it with the character it stood for"
        ) from None
    return text
