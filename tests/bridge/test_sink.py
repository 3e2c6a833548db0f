import time
async def test_probe(subscriber):
    print("ok", subscriber)
