"""One function called from several Python threads at once, for the tests that check concurrent
calls give what serial calls give."""
import threading


def results_from_threads(call, threads, calls_each):
    """Every result of call(), run calls_each times in each of `threads` threads started
    together; the first exception a thread met is raised here, in the test's thread."""
    results, errors = [], []

    def work():
        try:
            for _ in range(calls_each):
                results.append(call())
        except Exception as e:  # noqa: BLE001 - raised below
            errors.append(e)

    pool = [threading.Thread(target=work) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    if errors:
        raise errors[0]
    return results
