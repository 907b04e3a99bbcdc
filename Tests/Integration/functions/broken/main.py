import module_that_does_not_exist  # noqa: F401  (the import fails: the instance never becomes ready)


def handler(event, context):
    return "unreachable"
