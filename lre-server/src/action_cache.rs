//! The ActionCache gRPC service. An action's result is kept under the request's digest
//! function: the same action hash under SHA-256 and BLAKE3 names two entries.

use std::sync::Arc;

use bazel_remote_apis::build::bazel::remote::execution::v2::{
    action_cache_server::ActionCache, ActionResult, GetActionResultRequest,
    UpdateActionResultRequest,
};
use tonic::{Request, Response, Status};

use crate::auth::Access;
use crate::context::{ResultSource, ServerContext};
use crate::digest::{Digest, DigestFunction};
use crate::error::Error;
use crate::request_meta::RequestMeta;

pub struct ActionCacheService {
    cache: Arc<ServerContext>,
}

impl ActionCacheService {
    pub fn new(cache: Arc<ServerContext>) -> Self {
        ActionCacheService { cache }
    }
}

fn required_digest(
    function: DigestFunction,
    d: &Option<bazel_remote_apis::build::bazel::remote::execution::v2::Digest>,
) -> Result<Digest, Error> {
    Digest::from_opt_proto(function, d)?
        .ok_or_else(|| Error::InvalidArgument("action_digest is required".into()))
}

#[tonic::async_trait]
impl ActionCache for ActionCacheService {
    async fn get_action_result(
        &self,
        request: Request<GetActionResultRequest>,
    ) -> Result<Response<ActionResult>, Status> {
        let _t = self.cache.metrics.timer("GetActionResult");
        let req = request.get_ref();
        let caller = self
            .cache
            .authorize_grpc(&request, &req.instance_name, Access::Read)?;
        let function = DigestFunction::from_request(req.digest_function)?;
        let action = required_digest(function, &req.action_digest)?;
        let found = self
            .cache
            .get_action_result(&req.instance_name, function, action.hash)
            .await?;
        let meta = RequestMeta::of_caller(&request, &caller);
        self.cache.activity.lookup(
            &req.instance_name,
            meta.as_ref(),
            action,
            found.as_ref().map(|h| h.provenance.as_ref()),
        );
        match found {
            Some(hit) => Ok(Response::new(hit.result)),
            None => Err(Error::NotFound(format!("no complete action result for {action}")).into()),
        }
    }

    async fn update_action_result(
        &self,
        request: Request<UpdateActionResultRequest>,
    ) -> Result<Response<ActionResult>, Status> {
        let _t = self.cache.metrics.timer("UpdateActionResult");
        let req = request.get_ref();
        let caller = self
            .cache
            .authorize_grpc(&request, &req.instance_name, Access::Write)?;
        let function = DigestFunction::from_request(req.digest_function)?;
        let action = required_digest(function, &req.action_digest)?;
        let result = req
            .action_result
            .as_ref()
            .ok_or_else(|| Error::InvalidArgument("action_result is required".into()))?;
        self.cache
            .update_action_result(
                &req.instance_name,
                function,
                action.hash,
                result,
                ResultSource::Uploaded { caller: &caller },
            )
            .await?;
        Ok(Response::new(result.clone()))
    }
}
