import numpy as np
import pytest
import torch

from privimage.evaluate.classify import SmallCNN
from privimage.evaluate.features import extract_features, load_proxy_classifier, proxy_feature_net


def test_proxy_classifier_loads_and_gives_features_and_logits(tmp_path):
    torch.save(SmallCNN(1, 3, width=4), tmp_path / "classifier.pt")
    net = proxy_feature_net(load_proxy_classifier(tmp_path / "classifier.pt"))
    assert net.kind == "proxy" and net.metric_name("fid") == "proxy_fid"
    images = torch.randint(0, 256, (5, 1, 12, 12), dtype=torch.uint8)
    feats, logits = extract_features(net, images, batch_size=2)
    assert feats.shape == (5, 16) and logits.shape == (5, 3)
    # batching does not change the result (eval mode: no batch statistics)
    feats_one, _ = extract_features(net, images, batch_size=5)
    np.testing.assert_allclose(feats, feats_one, rtol=1e-5, atol=1e-6)


def test_bf16_is_a_cuda_only_path_and_a_no_op_on_cpu():
    net = proxy_feature_net(SmallCNN(3, 4, width=4))
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    fp32, _ = extract_features(net, images, bf16=False)
    bf16, _ = extract_features(net, images, bf16=True, device="cpu")
    np.testing.assert_array_equal(fp32, bf16)


def test_the_query_classifier_file_is_the_proxy_network(tmp_path):
    from privimage.query import QueryClassifier

    QueryClassifier(num_classes=6, channels=3, resolution=16, width=8).save(tmp_path / "classifier.pt")
    net = proxy_feature_net(load_proxy_classifier(tmp_path / "classifier.pt"))
    images = torch.randint(0, 256, (3, 1, 32, 32), dtype=torch.uint8)  # its prepare() resizes and makes RGB
    feats, logits = extract_features(net, images)
    assert feats.shape == (3, 32) and logits.shape == (3, 6)


def test_a_file_that_is_no_classifier_is_refused(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "classifier.pt")
    with pytest.raises(ValueError, match="classifier.pt holds a dict"):
        load_proxy_classifier(tmp_path / "classifier.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt does not exist"):
        load_proxy_classifier(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="no .features"):
        proxy_feature_net(torch.nn.Linear(2, 2))
