"""Usage reports across accounts, read and written in the inbox of `usage_reports` (S3).

Each account's scheduled run writes, per region, the AMIs of other accounts its resources use, under
`<prefix>reports/<its account id>/<region>.json`; the inbox's bucket policy lets an account write only
under its own id. An owner reads the report of each account it shares an AMI with, from that account's
prefix only, and dates it by S3's LastModified (set by S3, not by the writer).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence, Set
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from botocore import xform_name
from botocore.exceptions import BotoCoreError, ClientError
from pydantic import ValidationError

from ami_janitor.aws.errors import error_code, error_text
from ami_janitor.aws.inventory.get_parameters import get_parameters
from ami_janitor.aws.inventory.reading import SourceFailed, host_not_found, items, optional, source
from ami_janitor.core.model import ReceivedReport, Reference, RegionInventory, UsageView
from ami_janitor.core.policy import UsageReports
from ami_janitor.core.usage import UsageReport, consumer_grants, report_of, reports_needed
from ami_janitor.core.validation import describe_validation_error

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

    from ami_janitor.aws.clients import RegionClients

# A member account's scheduled run: its own report ...
PUBLISH_PERMISSIONS: list[str] = ["s3:PutObject"]
# ... with the AMIs its Image Builder recipes build on, which no reference source lists: an image
# recipe's parent image and a container recipe's build instance image, read from the recipes themselves
# (an AMI its owner disabled, no longer shared with the account, is still named there): its own recipes
# and those other accounts share with it (its pipelines may build from them). Where a recipe names
# another account's Image Builder image or SSM parameter, the AMI it stands for now is read from it
# (GetImage resolves a version with wildcards to its latest available build, as a build would).
RECIPE_PERMISSIONS: list[str] = [
    "imagebuilder:GetImage",
    "imagebuilder:ListContainerRecipes",
    "imagebuilder:ListImageRecipes",
    "ssm:GetParameters",
]
_RECIPE_PAGE = 100  # ListImageRecipes and ListContainerRecipes: at most 100 a page
_RECIPE_OWNERS = ("Self", "Shared")
# Image Builder images that stand for no AMI of another account the janitor manages.
_MANAGED_IMAGE_OWNERS = frozenset({"aws", "aws-marketplace"})
# An owner's plan, and the slice worker's fresh check: the reports of the accounts it shares with
# (s3:ListBucket makes a missing report answer 404, not 403).
READ_PERMISSIONS: list[str] = sorted(["s3:GetObject", "s3:ListBucket"])
# Shares to an organization or OU are expanded to accounts where the owner may call Organizations.
ORGANIZATIONS_PERMISSIONS: list[str] = sorted(
    [
        "organizations:DescribeOrganization",
        "organizations:ListAccounts",
        "organizations:ListAccountsForParent",
        "organizations:ListChildren",
    ]
)
# Organizations' largest pages (ListAccounts, ListAccountsForParent: 20; ListChildren: 20).
_ORGANIZATIONS_PAGE = 20
# The largest report an owner reads (about 300,000 references): one account's report larger than
# this is not read, so it cannot exhaust the memory of the run that reads it (its AMIs are kept).
MAX_REPORT_BYTES = 32 * 1024 * 1024
_READ_CHUNK = 1024 * 1024
# Only a closed account is gone: a suspended one (or one pending closure) may be reinstated within 90
# days, its launch templates still naming the AMI, so it still counts as a consumer (fail safe).
_GONE = frozenset({"CLOSED"})


def own_account(clients: RegionClients) -> str:
    """The account the janitor runs as (GetCallerIdentity needs no permission), asked once per run."""
    if "account" not in clients.run_facts:
        clients.run_facts["account"] = str(clients.sts.get_caller_identity()["Account"])
    return str(clients.run_facts["account"])


def recipe_uses(clients: RegionClients, account: str) -> tuple[list[Reference], list[str]]:
    """The AMIs the Image Builder recipes of this account, or shared with it, build on (image recipes'
    parent image, container recipes' instance image: an AMI id, or another account's Image Builder
    image or SSM parameter, read for the AMI it stands for here now), and what the report cannot vouch
    for: a read that failed, or a recipe's image that could not be resolved (the report then says so,
    and owners keep what they share with the account)."""
    found: list[Reference] = []
    unread: list[str] = []
    elsewhere: dict[str, list[tuple[str, str, str]]] = {}  # image -> (what, recipe, field) naming it
    for api, key, field, what in (
        ("ListImageRecipes", "imageRecipeSummaryList", "parentImage", "image recipe"),
        ("ListContainerRecipes", "containerRecipeSummaryList", "instanceImage", "container recipe"),
    ):
        for owner in _RECIPE_OWNERS:

            def read(operation: str = xform_name(api), key: str = key, owner: str = owner) -> list[Any]:
                return list(items(clients.client("imagebuilder"), operation, key, _RECIPE_PAGE, owner=owner))

            try:
                recipes = optional(f"imagebuilder:{api} ({owner})", read) or []
            except SourceFailed as failure:
                if host_not_found(failure):
                    return [], []  # a region without Image Builder has no recipes
                unread.append(str(failure))
                continue
            for recipe in recipes:
                image, arn = str(recipe.get(field) or ""), str(recipe.get("arn") or "")
                if image.startswith("ami-"):
                    found.append(_recipe_reference(image, what, arn, field))
                elif _of_another_account(image, account):
                    elsewhere.setdefault(image, []).append((what, arn, field))
                elif (problem := _unresolved(image)) is not None:
                    unread.append(f"{what} {arn}: its {field} {problem}")
    resolutions = _resolve(clients, sorted(elsewhere))
    for image, resolved in sorted(resolutions.items()):
        for what, arn, field in elsewhere[image]:
            if isinstance(resolved, str):
                unread.append(f"{what} {arn}: its {field} {image} is not resolved: {resolved}")
            else:
                found += [_recipe_reference(ami, what, arn, f"{field} {image}") for ami in resolved]
    return sorted(found, key=lambda r: (r.image_id, r.resource_id)), unread


def _recipe_reference(image_id: str, what: str, recipe: str, field: str) -> Reference:
    detail = f"referenced by {what} {recipe} ({field})"
    return Reference(image_id=image_id, kind="image-builder-recipe", resource_id=recipe, detail=detail)


def _of_another_account(image: str, account: str) -> bool:
    """An SSM parameter or Image Builder image, by ARN, of another account than this one (and, for an
    image, than AWS and the Marketplace): it may stand for an AMI that account shares with this one.
    The account's own stand for its own AMIs (its SSM parameters are read by the parameter scan)."""
    if image.startswith("ssm:"):
        fields = image.removeprefix("ssm:").split(":", 5)
        if fields[0] != "arn":
            return False  # a name: the account's own parameter
        # AWS's public parameters have no account in their ARN; any other ARN without one is malformed
        # (resolving it fails, and the report says so).
        public = len(fields) == 6 and fields[4] == "" and fields[5].startswith("parameter/aws/service/")
        return not public and (len(fields) < 6 or fields[4] != account)
    if image.startswith("arn:") and ":image/" in image:
        owner = image.split(":")[4]
        return owner not in _MANAGED_IMAGE_OWNERS and owner != account
    return False


def _unresolved(image: str) -> str | None:
    """Why a recipe's image, neither an AMI id nor another account's, may stand for an AMI the report
    does not name; None where it cannot: none given (Image Builder's default), an SSM parameter or an
    Image Builder image of the account's own or of AWS's."""
    if not image or image.startswith("ssm:") or (image.startswith("arn:") and ":image/" in image):
        return None
    return f"{image!r} is neither an AMI id, an SSM parameter nor an Image Builder image"


def _resolve(clients: RegionClients, images: Sequence[str]) -> dict[str, list[str] | str]:
    """Each of other accounts' Image Builder images and SSM parameters -> the AMIs in this region it
    stands for now, or why that could not be read."""
    parameters = [image for image in images if image.startswith("ssm:")]
    resolved = _parameter_amis(clients, parameters) if parameters else {}
    for image in images:
        if image not in resolved:
            resolved[image] = _image_amis(clients, image)
    return resolved


def _image_amis(clients: RegionClients, image: str) -> list[str] | str:
    """The AMIs in this region of an Image Builder image: a build version's, or for a version with
    wildcards its latest available build's (GetImage resolves it as a build would)."""
    try:
        with source(f"imagebuilder:GetImage {image}"):
            answer = clients.client("imagebuilder").get_image(imageBuildVersionArn=image).get("image") or {}
            amis = (answer.get("outputResources") or {}).get("amis") or []
            here = sorted(str(ami["image"]) for ami in amis if ami.get("region") == clients.region)
    except SourceFailed as failure:
        return str(failure)
    if not here:
        # A build not done (or not distributed here) names no AMI: what it stands for is not known.
        state = (answer.get("state") or {}).get("status") or "of no state"
        return f"build {answer.get('arn') or image} ({state}) has no AMI in {clients.region}"
    return here


def _parameter_amis(clients: RegionClients, parameters: Sequence[str]) -> dict[str, list[str] | str]:
    """Each 'ssm:<parameter ARN>' -> the AMI id its value is (ten a call), or why it is not read."""
    resolved: dict[str, list[str] | str] = {}
    names: dict[str, str] = {}
    for image in parameters:
        name = image.removeprefix("ssm:")
        if len(name.split(":", 5)) < 6:  # asked beside others, it would fail their call too
            resolved[image] = "not a parameter ARN"
        else:
            names[image] = name
    if not names:
        return resolved
    try:
        with source("ssm:GetParameters"):
            read = get_parameters(clients.ssm, names.values())
    except SourceFailed as failure:
        return resolved | dict.fromkeys(names, str(failure))
    for image, name in names.items():
        value = str(read[name].get("Value") or "") if name in read else ""
        if value.startswith("ami-"):
            resolved[image] = [value]
        elif name in read:
            resolved[image] = f"its value {value[:64]!r} is not an AMI id"
        else:
            resolved[image] = "not found, or not shared with the account"
    return resolved


def publish_report(
    clients: RegionClients,
    settings: UsageReports,
    account: str,
    inventory: RegionInventory,
    now: datetime,
    recipes: Iterable[Reference] = (),
    unread: Sequence[str] = (),
) -> str:
    """Write the account's report for the inventory's region to the inbox (its own prefix), with the
    `recipes` (recipe_uses) beside the inventory's references, and what it could not read (`unread`:
    owners then keep what they share with the account); the key."""
    references = [*inventory.references, *recipes]
    report = report_of(account, inventory.region, inventory.images, references, now, unread)
    key = settings.report_key(account, inventory.region)
    clients.s3.put_object(
        Bucket=settings.bucket,
        Key=key,
        # `unread` only where it has something: an owner of before the field refuses a report with it.
        Body=report.model_dump_json(indent=1, exclude=None if unread else {"unread"}).encode(),
        ContentType="application/json",
        **settings.owner_check(),
    )
    return key


def inbox_error(settings: UsageReports, error: ClientError | BotoCoreError) -> str:
    """The error of a call on the inbox; an AccessDenied where S3 checks the bucket's owner says that
    the bucket may be of another account (a mistyped name, or one deleted and taken by an outsider)."""
    text = error_text(error)
    if settings.inbox_account and isinstance(error, ClientError) and error_code(error) == "AccessDenied":
        text += (
            f" (the owner check: S3 refuses a bucket not owned by {settings.inbox_account},"
            " usage_reports.inbox_account)"
        )
    return text


def read_report(
    s3: S3Client, settings: UsageReports, account: str, region: str, about: Set[str] | None = None
) -> ReceivedReport | None:
    """An account's report for a region, from that account's prefix only (its uses of the AMIs `about`
    alone, where given: a report may name tens of thousands); None where it sent none. A
    report that cannot be read or does not describe that account and region is returned with its
    problem: it keeps what is shared with the account (fail safe). So is a missing one, with `required:
    false`, of an account that reports for other regions: it runs the janitor, and its stack in this
    region is missing or failing (a StackSet instance that failed, a rollout not there yet)."""
    key = settings.report_key(account, region)
    try:
        answer = s3.get_object(Bucket=settings.bucket, Key=key, **settings.owner_check())
        received_at = answer["LastModified"]
        body = _read_at_most(answer["Body"], MAX_REPORT_BYTES)
    except ClientError as error:
        if error_code(error) in ("NoSuchKey", "404"):
            return None if settings.required else _none_here(s3, settings, account, region)
        return _unreadable(account, f"s3://{settings.bucket}/{key}: {inbox_error(settings, error)}")
    except (BotoCoreError, KeyError) as error:
        return _unreadable(account, f"s3://{settings.bucket}/{key}: {error_text(error)}")
    if body is None:
        return _unreadable(account, f"{key}: larger than {MAX_REPORT_BYTES:,} bytes: not read", received_at)
    try:
        report = UsageReport.model_validate_json(body)
    except ValidationError as error:
        return _unreadable(account, f"{key}: {describe_validation_error(error)}", received_at)
    if report.account != account or report.region != region:
        return _unreadable(
            account, f"{key} names account {report.account} in {report.region}: not believed", received_at
        )
    if report.unread:  # what it names is not all it uses
        return _unreadable(account, f"{key} is incomplete: {'; '.join(report.unread)}", received_at)
    uses = {
        image_id: tuple(details)
        for image_id, details in report.uses.items()
        if about is None or image_id in about
    }
    return ReceivedReport(account=account, received_at=received_at, uses=uses)


def _read_at_most(stream: Any, limit: int) -> bytes | None:
    """The whole body, or None (the rest unread) once it is longer than `limit` bytes. Read to its end
    otherwise, so that botocore still checks it against its Content-Length."""
    body = bytearray()
    while chunk := stream.read(_READ_CHUNK):
        body += chunk
        if len(body) > limit:
            stream.close()
            return None
    return bytes(body)


def _none_here(s3: S3Client, settings: UsageReports, account: str, region: str) -> ReceivedReport | None:
    """None (no report: not using what is shared with it, as `required: false` takes it) where the
    account sent no report for any region; a report with its problem where it sent some for other
    regions, or where that cannot be listed (one ListObjectsV2 of its prefix)."""
    prefix = settings.account_prefix(account)
    try:
        listed = s3.list_objects_v2(
            Bucket=settings.bucket, Prefix=prefix, MaxKeys=1, **settings.owner_check()
        )
    except (ClientError, BotoCoreError) as error:
        return _unreadable(account, f"s3://{settings.bucket}/{prefix}: {inbox_error(settings, error)}")
    if not listed.get("KeyCount") and not listed.get("Contents"):
        return None
    return _unreadable(
        account,
        f"no report for {region}, though the account reports for other regions (its stack in {region} may be "
        "missing or failing)",
    )


def _unreadable(account: str, problem: str, received_at: datetime | None = None) -> ReceivedReport:
    return ReceivedReport(account=account, received_at=received_at or datetime.now(UTC), problem=problem)


def expand_grants(
    organizations: Any, grants: Iterable[str]
) -> tuple[dict[str, tuple[str, ...] | None], list[str]]:
    """'org:ARN' / 'ou:ARN' -> the active accounts in it (an OU's nested OUs included), or None where
    Organizations cannot say (this account is not the management account nor a delegated
    administrator, or the grant is of another organization); plus a note on why."""
    wanted = sorted(set(grants))
    if not wanted:
        return {}, []
    try:
        organization = organizations.describe_organization()["Organization"]
        own_org = str(organization["Id"])
        expansions: dict[str, tuple[str, ...] | None] = {}
        for grant in wanted:
            kind, _, arn = grant.partition(":")
            # organization/o-id or ou/o-id/ou-id: the id exactly (o-abc is not o-abcdef).
            if arn.split("/")[1:2] != [own_org]:
                expansions[grant] = None
            elif kind == "org":
                listed = _pages(organizations, "list_accounts", "Accounts")
                if not listed:  # an organization holds its management account at least
                    raise KeyError("ListAccounts listed no account of the organization")
                expansions[grant] = _active(listed)
            else:
                expansions[grant] = _accounts_under(organizations, arn.rsplit("/", 1)[-1], set())
    except (ClientError, BotoCoreError, KeyError, AttributeError, TypeError) as error:
        # An answer of another shape than Organizations' (an entry that is no account) is no answer.
        note = f"organizations: {error_text(error)}: shares to organizations and OUs are kept (fail safe)"
        return dict.fromkeys(wanted), [note]
    return expansions, []


def _expansions(
    clients: RegionClients, grants: set[str]
) -> tuple[dict[str, tuple[str, ...] | None], list[str]]:
    """expand_grants, each grant asked once per run: an organization's accounts are the same from
    every region. Where Organizations could not answer, the next region that needs it asks again."""
    known: dict[str, tuple[str, ...] | None] = clients.run_facts.setdefault("expansions", {})
    asked, notes = expand_grants(clients.organizations, grants - known.keys())
    if not notes:
        known.update(asked)
    return {grant: asked[grant] if grant in asked else known[grant] for grant in grants}, notes


def _accounts_under(organizations: Any, parent: str, seen: set[str]) -> tuple[str, ...]:
    """The active accounts under `parent`, its nested OUs' included (each OU read once: an answer that
    names an OU again cannot loop)."""
    seen.add(parent)
    accounts = set(_active(_pages(organizations, "list_accounts_for_parent", "Accounts", ParentId=parent)))
    children = _pages(
        organizations, "list_children", "Children", ParentId=parent, ChildType="ORGANIZATIONAL_UNIT"
    )
    for child in children:
        if str(child["Id"]) not in seen:
            accounts.update(_accounts_under(organizations, str(child["Id"]), seen))
    return tuple(sorted(accounts))


def _pages(organizations: Any, operation: str, key: str, **params: Any) -> list[dict[str, Any]]:
    """Every entry of every page; a page without its list is a malformed answer (KeyError: the shares
    to organizations and OUs are then kept), never an empty one."""
    paginator = organizations.get_paginator(operation)
    pages = paginator.paginate(**params, PaginationConfig={"PageSize": _ORGANIZATIONS_PAGE})
    return [entry for page in pages for entry in page[key]]


def _active(accounts: Iterable[dict[str, Any]]) -> tuple[str, ...]:
    return tuple(
        sorted(str(a["Id"]) for a in accounts if str(a.get("State") or a.get("Status") or "") not in _GONE)
    )


def load_usage(
    clients: RegionClients, settings: UsageReports, inventory: RegionInventory, image_ids: Iterable[str]
) -> RegionInventory:
    """The inventory with the usage reports the plan needs about `image_ids` (those whose launch
    permissions were read): the reports of every account they are shared with, for this region."""
    wanted = set(image_ids)
    if inventory.error is not None:
        return inventory
    try:
        account = own_account(clients)
    except (BotoCoreError, ClientError, KeyError) as error:
        failure = f"sts:GetCallerIdentity: {error_text(error)}"
        return RegionInventory(region=inventory.region, notes=inventory.notes, error=failure)
    shared = [i for i in inventory.images if i.image_id in wanted and consumer_grants(i, account)]
    if not shared:
        return inventory._replace(usage=UsageView(own_account=account))
    grants = {g for image in shared for g in consumer_grants(image, account) if not g.startswith("user:")}
    expansions, notes = _expansions(clients, grants)
    accounts = reports_needed(shared, account, expansions)
    # The region's own AMIs: a report names others' AMIs it uses, and a decision may weigh it for any of
    # them (a disabled AMI's consumers are those its ledger recorded, whether or not it was read now).
    about = {image.image_id for image in inventory.images}
    received = [read_report(clients.s3, settings, a, inventory.region, about) for a in sorted(accounts)]
    reports = {r.account: r for r in received if r is not None}
    if not settings.required:
        notes += [
            f"account {a} sent no usage report for {inventory.region} (usage_reports.required is false: "
            "taken as not using what is shared with it)"
            for a in sorted(accounts - set(reports))
        ]
    view = UsageView(own_account=account, reports=reports, expansions=expansions)
    return inventory._replace(usage=view, notes=tuple(dict.fromkeys([*inventory.notes, *notes])))
