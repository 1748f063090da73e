"""client_app/app: site_private keeps file paths and patient ids out of the server's error."""

import pytest

from client_app.app import SiteFailure, site_private


def test_site_private_keeps_paths_and_ids_out_of_the_error(caplog):
    @site_private
    def train(msg, context):
        raise FileNotFoundError("/data/hospital/patient_JaneRoe_77.bmp")

    with pytest.raises(SiteFailure) as raised:
        train(None, None)
    text = str(raised.value)
    assert "FileNotFoundError" in text and "train" in text
    assert "JaneRoe" not in text and "/data" not in text
    assert raised.value.__cause__ is None and raised.value.__suppress_context__
    assert "patient_JaneRoe_77.bmp" in caplog.text  # the full story stays in the site's log
