//! The google.longrunning Operations service for execution operations.

use std::sync::Arc;
use std::time::Duration;

use bazel_remote_apis::google::longrunning::{
    operations_server::Operations, CancelOperationRequest, DeleteOperationRequest,
    GetOperationRequest, ListOperationsRequest, ListOperationsResponse, Operation,
    WaitOperationRequest,
};
use bazel_remote_apis::google::protobuf::Empty;
use tonic::{Request, Response, Status};

use crate::auth::Access;
use crate::context::ServerContext;
use crate::error::Error;
use crate::longrunning::operation;
use crate::scheduler::Scheduler;

pub struct OperationsService {
    cache: Arc<ServerContext>,
    scheduler: Arc<Scheduler>,
}

impl OperationsService {
    pub fn new(cache: Arc<ServerContext>, scheduler: Arc<Scheduler>) -> Self {
        OperationsService { cache, scheduler }
    }

    async fn current<T>(
        &self,
        request: &Request<T>,
        name: &str,
        access: Access,
    ) -> Result<Operation, Error> {
        let snap = self
            .scheduler
            .snapshot(name)
            .await?
            .ok_or_else(|| Error::NotFound(format!("no operation {name:?}")))?;
        self.cache
            .authorize_grpc(request, &snap.key.instance, access)?;
        Ok(operation(name, &snap.key.action, &snap.stage))
    }
}

#[tonic::async_trait]
impl Operations for OperationsService {
    async fn get_operation(
        &self,
        request: Request<GetOperationRequest>,
    ) -> Result<Response<Operation>, Status> {
        let name = request.get_ref().name.clone();
        Ok(Response::new(
            self.current(&request, &name, Access::Read).await?,
        ))
    }

    async fn cancel_operation(
        &self,
        request: Request<CancelOperationRequest>,
    ) -> Result<Response<Empty>, Status> {
        let name = request.get_ref().name.clone();
        // Cancelling stops work others may be waiting on, so it takes execute access.
        self.current(&request, &name, Access::Execute).await?;
        self.scheduler.cancel(&name).await?;
        Ok(Response::new(Empty {}))
    }

    async fn wait_operation(
        &self,
        request: Request<WaitOperationRequest>,
    ) -> Result<Response<Operation>, Status> {
        let name = request.get_ref().name.clone();
        self.current(&request, &name, Access::Read).await?;
        let limit = request
            .get_ref()
            .timeout
            .as_ref()
            .map(|t| Duration::new(t.seconds.max(0) as u64, t.nanos.max(0) as u32))
            .filter(|d| !d.is_zero())
            .unwrap_or(Duration::from_secs(60));
        if let Some(mut rx) = self.scheduler.watch(&name).await? {
            let _ = tokio::time::timeout(limit, rx.wait_for(|s| s.is_done())).await;
        }
        Ok(Response::new(
            self.current(&request, &name, Access::Read).await?,
        ))
    }

    async fn list_operations(
        &self,
        _: Request<ListOperationsRequest>,
    ) -> Result<Response<ListOperationsResponse>, Status> {
        Err(Error::Unimplemented("listing operations is not supported".into()).into())
    }

    async fn delete_operation(
        &self,
        _: Request<DeleteOperationRequest>,
    ) -> Result<Response<Empty>, Status> {
        Err(
            Error::Unimplemented("operations are forgotten on their own after they finish".into())
                .into(),
        )
    }
}
