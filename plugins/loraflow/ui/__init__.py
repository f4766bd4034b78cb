"""The loraflow page in the Airflow UI: a FastAPI app mounted by the api-server at ``/loraflow``.

``app`` holds the routes (authenticated like Airflow's own API); ``data`` joins DAG runs from
the Airflow metadata DB with the model versions they registered in MLflow; ``page`` renders
that as HTML. The Airflow UI shows the page in its nav through the plugin's external view.
"""
