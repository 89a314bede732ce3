<?php
// Symfony Mailer with a sendmail transport. argv[1]: the transport DSN (sendmail://default?command=…);
// argv[2]: how many messages to send through that one transport.
// Exit status 0 when all were sent; otherwise the TransportException text on stdout and exit 3.
require '/usr/share/php/Symfony/Component/Mailer/autoload.php';

use Symfony\Component\Mailer\Exception\TransportExceptionInterface;
use Symfony\Component\Mailer\Mailer;
use Symfony\Component\Mailer\Transport;
use Symfony\Component\Mime\Email;

$mailer = new Mailer(Transport::fromDsn($argv[1]));
try {
    for ($i = 1; $i <= (int) ($argv[2] ?? 1); $i++) {
        $mailer->send((new Email())
            ->from('App <app@example.com>')
            ->to('to@example.com')
            ->cc('cc@example.com')
            ->bcc('bcc@example.com')
            ->subject("Symfony $i 测试")
            ->text("line1\n.\n..two dots\nünïcode $i\n"));
    }
} catch (TransportExceptionInterface $e) {
    echo $e->getMessage();
    exit(3);
}
