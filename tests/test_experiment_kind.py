from prado_dist.search.tracking import connect


def test_connect_marks_experiment_as_model_training(tmp_path):
    client, experiment_id = connect(f"sqlite:///{tmp_path}/mlflow.db", "paintings")
    tags = client.get_experiment(experiment_id).tags
    assert tags.get("mlflow.experimentKind") == "custom_model_development"
