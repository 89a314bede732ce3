"""What `--setup` tells the administrator per provider: where its SMTP password (or 授权码) comes
from (`GUIDANCE`), and how to register the application sendmail-shim logs in as with OAuth2
(`REGISTRATION`). Texts only."""

from .i18n import _

_CHINESE_CODE = _(
    "{provider}: log in to the web mailbox, open Settings → POP3/SMTP/IMAP, enable the SMTP "
    "service and create an authorization code (授权码). sendmail-shim logs in with that code, "
    "never with the web password."
)
GUIDANCE = {
    "163": _CHINESE_CODE,
    "126": _CHINESE_CODE,
    "yeah": _CHINESE_CODE,
    "qq": _(
        "{provider}: in QQ Mail open Settings → Account, enable the POP3/SMTP service and "
        "generate an authorization code (授权码); it replaces the QQ password here."
    ),
    "exmail": _(
        "{provider}: when secure login is on, create a client-specific password in Settings → "
        "Account → Secure login; otherwise use the mailbox password."
    ),
    "aliyun": _(
        "{provider}: check that POP3/SMTP is enabled in the mailbox settings; log in with the mailbox password."
    ),
    "gmail": _(
        "{provider}: turn on 2-Step Verification, then create an app password (Google Account → "
        "Security → App passwords). Google refuses the normal password."
    ),
    "outlook": _(
        "{provider}: Microsoft switches password SMTP logins off (Outlook.com since September 2024, "
        "Microsoft 365 by the end of December 2026), so this preset logs in with OAuth2: register an "
        "application (Microsoft Entra admin center → App registrations) with the SMTP.Send permission, "
        "set SMTP_OAUTH2_CLIENT_ID, then run sendmail-shim --oauth2-login. Authenticated SMTP must be "
        "allowed for the mailbox (Microsoft 365 admin center → the user → Mail → Manage email apps)."
    ),
}


# Registering the application sendmail-shim logs in as, per (family, flow). Sources:
# - Microsoft: https://learn.microsoft.com/en-us/exchange/client-developer/legacy-protocols/how-to-authenticate-an-imap-pop-smtp-application-by-using-oauth
#   (app registration in the Entra admin center; delegated SMTP.Send with offline_access; app-only
#   SMTP.SendAsApp with admin consent, then New-ServicePrincipal and Add-MailboxPermission in Exchange Online);
#   the device code flow needs "Allow public client flows".
# - Google: https://developers.google.com/identity/protocols/oauth2/native-app (a "Desktop app" OAuth client:
#   client id and secret) and https://developers.google.com/identity/protocols/oauth2#expiration (an external
#   app left in "Testing" gets refresh tokens that expire after 7 days).
REGISTRATION = {
    ("microsoft", "refresh_token"): _(
        "Register sendmail-shim as an application of your directory (Microsoft Entra admin center, "
        "https://entra.microsoft.com):\n"
        "  1. Applications → App registrations → New registration: any name; supported account types: this "
        "organization only (Outlook.com: personal Microsoft accounts too); no redirect URI.\n"
        "  2. Authentication → Allow public client flows: Yes (the device code login of --oauth2-login).\n"
        "  3. API permissions → Add a permission → Microsoft Graph → Delegated permissions: SMTP.Send and "
        "offline_access.\n"
        "  4. Overview: copy the Application (client) ID and the Directory (tenant) ID."),
    ("microsoft", "client_credentials"): _(
        "Register sendmail-shim as an application of your directory (Microsoft Entra admin center, "
        "https://entra.microsoft.com):\n"
        "  1. Applications → App registrations → New registration: any name; this organization only.\n"
        "  2. API permissions → Add a permission → APIs my organization uses → Office 365 Exchange Online → "
        "Application permissions: SMTP.SendAsApp; then Grant admin consent.\n"
        "  3. Certificates & secrets → New client secret: copy its Value (it is shown once).\n"
        "  4. Exchange Online PowerShell: New-ServicePrincipal -AppId <client id> -ObjectId <object id of its "
        "enterprise application>, then Add-MailboxPermission -Identity {user} -User <client id> -AccessRights "
        "FullAccess.\n"
        "  5. Overview: copy the Application (client) ID and the Directory (tenant) ID."),
    ("gmail", "refresh_token"): _(
        "Register sendmail-shim as an OAuth client (Google Cloud console, https://console.cloud.google.com):\n"
        "  1. Create a project (or pick one).\n"
        "  2. APIs & Services → OAuth consent screen: External (Internal for a Workspace domain); add {user} as "
        "a test user, then publish the app: the login of an app left in Testing expires after 7 days.\n"
        "  3. Credentials → Create credentials → OAuth client ID → Application type: Desktop app; copy the client "
        "ID and the client secret."),
}
