def handler(event, context):
    return {"instance": context.instance_id}
